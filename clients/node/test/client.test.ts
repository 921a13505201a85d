/**
 * Every method and the errors a caller can provoke, against a real `broker serve` process on
 * SQLite and on PostgreSQL, with the fake OAuth server as provider "acme" and the fake API
 * behind Proxy. Retries are counted by the broker's own audit rows (one per attempt, the same
 * request id on each).
 */
import { strict as assert } from "node:assert";
import { after, before, describe, test } from "node:test";
import * as broker from "@credential-broker/client";
import { BrokerClient } from "@credential-broker/client";
import {
  ADMIN_TOKEN,
  BACKENDS,
  BrokerProcess,
  PROXY_TOKEN,
  RUNNER_TOKEN,
  eventually,
  skipUnless,
  startFakeProvider,
} from "./support/broker";
import type { FakeProvider } from "./support/broker";

const CALLBACK = "https://app.example.test/api/integrations/acme/callback";
const FAST = { attempts: 5, initialBackoffMs: 50, maxBackoffMs: 200 };

async function rejects<E extends broker.BrokerError>(
  promise: Promise<unknown>,
  cls: abstract new (...args: never[]) => E,
): Promise<E> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof cls, `expected ${cls.name}, got ${String(error)}`);
    assert.equal(error.constructor, cls, `exactly ${cls.name}, got ${error.constructor.name}`);
    return error;
  }
  assert.fail(`expected ${cls.name}, the call succeeded`);
}

for (const backend of BACKENDS) {
  describe(`the client against a broker on ${backend}`, { skip: skipUnless(backend), timeout: 150_000 }, () => {
    let fake: FakeProvider;
    let server: BrokerProcess;
    let admin: BrokerClient;

    before(async () => {
      fake = await startFakeProvider();
      server = await new BrokerProcess({
        backend,
        fake,
        sections: {
          authorization: { max_pending_flows_per_caller: 50 },
          events: { max_streams_per_caller: 2 },
          proxy: { max_request_bytes: 4096 },
        },
      }).start();
      admin = new BrokerClient({ address: server.address, token: ADMIN_TOKEN, retry: FAST });
    });

    after(async () => {
      admin?.close();
      await server?.dispose();
      fake?.stop();
    });

    async function store(userId: string, expiresIn = 3600, accountId?: string, provider = "acme") {
      const grant = await fake.grant();
      const stored = await admin.storeIntegration({
        userId,
        provider,
        accountId,
        accessToken: grant.access_token,
        refreshToken: grant.refresh_token,
        expiresInSeconds: expiresIn,
        scopes: ["read"],
        metadata: { team: "t1", seats: 3 },
      });
      return stored.integration!;
    }

    test("store, get, list, token: plain values (Date, string enums, numbers, JSON)", async () => {
      const integration = await store("u-store");
      assert.equal(integration.status, "CONNECTED");
      assert.equal(integration.credentialType, "AUTHORIZATION_CODE");
      assert.ok(integration.createdAt instanceof Date);
      assert.ok(integration.expiresAt instanceof Date);
      assert.deepEqual(integration.metadata, { team: "t1", seats: 3 });
      assert.equal(integration.hasRefreshToken, true);

      const token = await admin.getAccessToken({ integrationId: integration.id, minValidFor: 60 });
      assert.match(token.accessToken, /^at/);
      assert.equal(token.tokenType, "Bearer");
      assert.ok(token.expiresAt!.getTime() > Date.now() + 60_000);
      assert.equal(token.headers["authorization"] ?? token.headers["Authorization"], `Bearer ${token.accessToken}`);

      const got = await admin.getIntegration({ userId: "u-store", provider: "acme" });
      assert.equal(got.integration!.id, integration.id);
      const page = await admin.listIntegrations({ userId: "u-store", status: "CONNECTED" });
      assert.deepEqual(page.integrations.map((i) => i.id), [integration.id]);
      const all = [];
      for await (const item of admin.iterIntegrations({ userId: "u-store", pageSize: 1 })) all.push(item.id);
      assert.deepEqual(all, [integration.id]);

      // A refresh the broker makes on demand: a token with 10 s left, asked for 60.
      const short = await store("u-short", 10);
      const refreshed = await admin.getAccessToken({ integrationId: short.id, minValidFor: 60 });
      assert.equal(refreshed.refreshed, true);
    });

    test("a credential of another kind (a oneof), and the events list", async () => {
      const stored = await admin.storeIntegration({
        userId: "u-key",
        provider: "keyed",
        credential: { apiKey: { key: "k-123", header: "X-Api-Key" } },
      });
      assert.equal(stored.integration!.credentialType, "API_KEY");
      const token = await admin.getAccessToken({ userId: "u-key", provider: "keyed" });
      assert.equal(token.headers["X-Api-Key"] ?? token.headers["x-api-key"], "k-123");
      const events = await admin.listIntegrationEvents({ userId: "u-key", types: ["CONNECTED"] });
      assert.equal(events.events.length, 1);
      const [event] = events.events;
      assert.equal(event!.type, "CONNECTED");
      assert.equal(typeof event!.id, "number");
      assert.ok(event!.occurredAt instanceof Date);
    });

    test("the authorization flow: begin, the provider's redirect, complete", async () => {
      const consent = async () => {
        const begun = await admin.beginAuthorization({ userId: "u-flow", provider: "acme", redirectUri: CALLBACK });
        assert.ok(begun.expiresAt instanceof Date);
        const answer = await fetch(begun.authorizationUrl, { redirect: "manual" });
        const back = new URL(answer.headers.get("location")!);
        return { state: back.searchParams.get("state")!, code: back.searchParams.get("code")! };
      };
      const stolen = await consent();
      await rejects(admin.completeAuthorization({ ...stolen, userId: "someone-else" }), broker.AuthorizationUserMismatch);
      const { state, code } = await consent();
      const done = await admin.completeAuthorization({ state, code, userId: "u-flow" });
      assert.equal(done.integration!.userId, "u-flow");
      assert.equal(done.created, true);
      await rejects(admin.completeAuthorization({ state, code, userId: "u-flow" }), broker.AuthorizationFlowInvalid);
    });

    test("grants: create, withGrant, get, list, revoke, and what a runner is refused", async () => {
      const integration = await store("u-grant");
      await store("u-other");
      const created = await admin.createGrant({ userId: "u-grant", providers: ["acme"], ttl: 300, runId: "run-1" });
      assert.match(created.grantToken, /^cbg_/);
      assert.equal(created.grant!.state, "ACTIVE");
      assert.ok(created.expiresAt!.getTime() - Date.now() <= 300_000);
      const base = new BrokerClient({ address: server.address, token: RUNNER_TOKEN });
      try {
        await rejects(base.getAccessToken({ integrationId: integration.id }), broker.GrantRequired);
        const runner = base.withGrant(created.grantToken);
        const token = await runner.getAccessToken({ userId: "u-grant", provider: "acme" });
        assert.equal(token.integrationId, integration.id);
        await rejects(runner.getAccessToken({ userId: "u-other", provider: "acme" }), broker.GrantScope);
        await rejects(runner.createGrant({ userId: "u-grant", providers: ["acme"] }), broker.PermissionDenied);
        await rejects(base.withGrant("cbg_not-a-grant").getAccessToken({ integrationId: integration.id }), broker.GrantInvalid);

        assert.equal((await admin.getGrant({ grantId: created.grantId })).grant!.runId, "run-1");
        const listed = await admin.listGrants({ runId: "run-1" });
        assert.deepEqual(listed.grants.map((g) => g.id), [created.grantId]);
        const revoked = await admin.revokeGrant({ runId: "run-1" });
        assert.equal(revoked.grants[0]!.state, "REVOKED");
        assert.ok(revoked.grants[0]!.revokedAt instanceof Date);
        await rejects(runner.getAccessToken({ userId: "u-grant", provider: "acme" }), broker.GrantRevoked);
        await rejects(admin.getGrant({ grantId: "00000000-0000-0000-0000-000000000000" }), broker.GrantNotFound);
      } finally {
        base.close();
      }
    });

    test("proxy: the provider API called with the integration's credential", async () => {
      await store("u-proxy");
      const answer = await admin.proxy({ userId: "u-proxy", provider: "acme", path: "/v1/items", query: { page: "1" } });
      assert.equal(answer.status, 200);
      assert.ok(answer.ok);
      assert.ok(answer.body instanceof Uint8Array);
      assert.equal((answer.json() as { ok: boolean }).ok, true);
      const posted = await admin.proxy({ userId: "u-proxy", provider: "acme", method: "post", path: "/v1/items", json: { a: 1 } });
      assert.equal(posted.status, 200);
      await rejects(
        admin.proxy({ userId: "u-proxy", provider: "acme", method: "POST", path: "/v1/items", body: "x".repeat(5000) }),
        broker.ProxyRequestTooLarge,
      );
      await admin.storeIntegration({ userId: "u-proxy", provider: "keyed", credential: { apiKey: { key: "k", header: "X-Api-Key" } } });
      await rejects(admin.proxy({ userId: "u-proxy", provider: "keyed", path: "/v1" }), broker.ProxyNotConfigured);
      const proxyOnly = new BrokerClient({ address: server.address, token: PROXY_TOKEN });
      try {
        await rejects(proxyOnly.getAccessToken({ userId: "u-proxy", provider: "acme" }), broker.TokenExposureDenied);
      } finally {
        proxyOnly.close();
      }
    });

    test("disconnect, and the errors of selecting and serving", async () => {
      const integration = await store("u-disc");
      const gone = await admin.disconnect({ integrationId: integration.id, reason: "user clicked disconnect" });
      assert.equal(gone.integration!.status, "DISCONNECTED");
      assert.equal(gone.revocation, "REVOKED");
      assert.ok(gone.integration!.disconnectedAt instanceof Date);
      await rejects(admin.getAccessToken({ integrationId: integration.id }), broker.IntegrationDisconnected);

      const missing = await rejects(admin.getAccessToken({ userId: "nobody", provider: "acme" }), broker.IntegrationNotFound);
      assert.equal(missing.code, broker.Status.NOT_FOUND);
      assert.equal(missing.codeName, "NOT_FOUND");
      assert.ok(missing.requestId);
      const invalid = await rejects(admin.getAccessToken({ userId: "u1" }), broker.InvalidArgument);
      assert.ok(invalid.metadata["field"]);
      await rejects(admin.beginAuthorization({ userId: "u1", provider: "nope", redirectUri: CALLBACK }), broker.UnknownProvider);
      await store("u-two", 3600, "a1");
      await store("u-two", 3600, "a2");
      await rejects(admin.getAccessToken({ userId: "u-two", provider: "acme" }), broker.AmbiguousIntegration);
      const scoped = await store("u-scope");
      await rejects(admin.getAccessToken({ integrationId: scoped.id, requiredScopes: ["admin"] }), broker.InsufficientScope);
      await rejects(admin.getAccessToken({ integrationId: scoped.id, minValidFor: 7200 }), broker.MinValidityUnattainable);
      const bad = new BrokerClient({ address: server.address, token: "wrong" });
      try {
        await rejects(bad.listIntegrations({ userId: "u1" }), broker.Unauthenticated);
      } finally {
        bad.close();
      }
      await assert.rejects(admin.getAccessToken({ userId: "u1", provider: "acme", status: 1 } as never), TypeError);
    });

    test("what the provider answers: reauthorization, misconfiguration", async () => {
      const first = await store("u-reauth");
      await fake.control("/_fail?kind=invalid_grant&times=1");
      await rejects(admin.getAccessToken({ integrationId: first.id, forceRefresh: true }), broker.ReauthorizationRequired);
      const second = await store("u-misc");
      await fake.control("/_fail?kind=invalid_client&times=1");
      await rejects(admin.getAccessToken({ integrationId: second.id, forceRefresh: true }), broker.ProviderMisconfigured);
    });

    test("limits: pending flows and event streams", async () => {
      const flows = new BrokerClient({ address: server.address, token: ADMIN_TOKEN, retry: { attempts: 1 } });
      try {
        const error = await (async () => {
          for (let i = 0; i < 60; i += 1) {
            try {
              await flows.beginAuthorization({ userId: `u-limit-${i}`, provider: "acme", redirectUri: CALLBACK });
            } catch (caught) {
              return caught;
            }
          }
          return undefined;
        })();
        assert.ok(error instanceof broker.FlowLimit, String(error));
        assert.equal(error.metadata["setting"], "authorization.max_pending_flows_per_caller");
      } finally {
        flows.close();
      }
      const controller = new AbortController();
      const streams = [0, 1].map(() => admin.watchIntegrationEvents({ userId: "none" }, { signal: controller.signal }));
      const pending = streams.map((s) => s.next().catch(() => undefined));
      const third = admin.watchIntegrationEvents({ userId: "none" });
      await eventually(async () => {
        await rejects(third.next(), broker.CallerStreamLimit);
        return true;
      });
      controller.abort();
      await Promise.all(pending);
    });

    test("retries: UNAVAILABLE retried after RetryInfo's delay, one audit row per attempt", async () => {
      const integration = await store("u-retry", 10);
      await fake.control("/_fail?kind=unavailable&times=2&retry_after=1");
      const started = Date.now();
      const token = await admin.getAccessToken({ integrationId: integration.id, minValidFor: 60 }, { requestId: "node-retry-1" });
      assert.equal(token.refreshed, true);
      assert.ok(Date.now() - started >= 2000, "waited RetryInfo's second twice");
      const rows = await eventually(() => {
        const found = server.audit("--user", "u-retry").filter((row) => row["request_id"] === "node-retry-1");
        return found.length >= 3 ? found : undefined;
      });
      assert.equal(rows!.length, 3);
    });

    test("retries: never past the deadline; other codes never retried", async () => {
      // Its own provider: a 429 with Retry-After pauses every refresh of the provider it came from.
      const integration = await store("u-late", 10, undefined, "paused");
      await fake.control("/_fail?kind=rate_limited&times=0&retry_after=30");
      try {
        const error = await rejects(
          admin.getAccessToken({ integrationId: integration.id, minValidFor: 60 }, { deadlineMs: 5000, requestId: "node-late-1" }),
          broker.ProviderUnavailable,
        );
        assert.ok(error.retryAfterMs! >= 30_000);
        assert.equal(error.metadata["integration_id"], integration.id);
      } finally {
        await fake.control("/_reset");
      }
      const once = await store("u-once", 10);
      await fake.control("/_fail?kind=invalid_grant&times=1");
      await rejects(admin.getAccessToken({ integrationId: once.id, minValidFor: 60 }, { requestId: "node-once-1" }), broker.ReauthorizationRequired);
      await eventually(() => server.audit("--user", "u-once").some((r) => r["request_id"] === "node-once-1"));
      assert.equal(server.audit("--user", "u-late").filter((r) => r["request_id"] === "node-late-1").length, 1);
      assert.equal(server.audit("--user", "u-once").filter((r) => r["request_id"] === "node-once-1").length, 1);
    });

    test("deadline and cancellation", async () => {
      await rejects(admin.listIntegrations({ userId: "u1" }, { deadlineMs: 1 }), broker.DeadlineExceeded);
      const controller = new AbortController();
      const call = admin.listIntegrations({ userId: "u1" }, { signal: controller.signal });
      controller.abort();
      await rejects(call, broker.Cancelled);
    });
  });
}

test("plaintext only to loopback unless allowInsecure", () => {
  assert.throws(() => new BrokerClient({ address: "broker.internal:50051", token: "t" }), /not a loopback address/);
  for (const address of ["127.0.0.1:1", "localhost:1", "[::1]:1", "unix:/tmp/x.sock"]) {
    new BrokerClient({ address, token: "t" }).close();
  }
  new BrokerClient({ address: "broker.internal:50051", token: "t", allowInsecure: true }).close();
  new BrokerClient({ address: "broker.internal:50051", token: "t", tls: {} }).close();
  assert.equal(String(new BrokerClient({ address: "127.0.0.1:1", token: "secret" })).includes("secret"), false);
});

test("a broker that comes up late is reached within the deadline", async () => {
  const fake = await startFakeProvider();
  const server = new BrokerProcess({ backend: "sqlite", fake });
  try {
    // Reserve the port and config first, then start serving after the first attempts failed.
    await server.start();
    await server.stop();
    const client = new BrokerClient({
      address: server.address,
      token: ADMIN_TOKEN,
      retry: { attempts: 100, initialBackoffMs: 200, maxBackoffMs: 500 },
    });
    try {
      const down = await rejects(client.listIntegrations({ userId: "u1" }, { deadlineMs: 1000 }), broker.Unavailable);
      assert.ok(down.requestId, "even an unanswered call names its request id");
      const call = client.listIntegrations({ userId: "u1" }, { deadlineMs: 60_000 });
      await new Promise((r) => setTimeout(r, 1000));
      await server.start();
      assert.deepEqual((await call).integrations, []);
    } finally {
      client.close();
    }
  } finally {
    await server.dispose();
    fake.stop();
  }
});
