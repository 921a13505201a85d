/**
 * The Next.js guide's route handlers (examples/nextjs), called as Next.js calls them — with a
 * standard Request and the route's params — against a real broker, and the guide (docs/node.md)
 * showing exactly these files.
 */
import { strict as assert } from "node:assert";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { ADMIN_TOKEN, BrokerProcess, NODE_CLIENT, ROOT, RUNNER_TOKEN, startFakeProvider } from "./support/broker";
import type { FakeProvider } from "./support/broker";

const EXAMPLE = join(NODE_CLIENT, "examples", "nextjs");
const FILES = [
  "lib/broker.ts",
  "lib/session.ts",
  "app/api/integrations/[provider]/connect/route.ts",
  "app/api/integrations/[provider]/callback/route.ts",
  "app/api/integrations/route.ts",
  "app/api/integrations/[provider]/disconnect/route.ts",
  "lib/workflow.ts",
];
const APP = "https://app.example.test";
const cookie = { cookie: "uid=alice" };
const params = (provider: string) => ({ params: Promise.resolve({ provider }) });

let fake: FakeProvider;
let server: BrokerProcess;

before(async () => {
  fake = await startFakeProvider();
  server = await new BrokerProcess({ backend: "sqlite", fake }).start();
  process.env.BROKER_ADDRESS = server.address;
  process.env.BROKER_TOKEN = ADMIN_TOKEN;
  process.env.BROKER_RUNNER_TOKEN = RUNNER_TOKEN;
  process.env.APP_URL = APP;
});

after(async () => {
  const { broker } = await import("../examples/nextjs/lib/broker");
  const { closeRunner } = await import("../examples/nextjs/lib/workflow");
  broker.close();
  closeRunner();
  await server?.dispose();
  fake?.stop();
});

test("connect, callback, list, a workflow step under a run grant, disconnect", { timeout: 120_000 }, async () => {
  const connect = await import("../examples/nextjs/app/api/integrations/[provider]/connect/route");
  const callback = await import("../examples/nextjs/app/api/integrations/[provider]/callback/route");
  const list = await import("../examples/nextjs/app/api/integrations/route");
  const disconnect = await import("../examples/nextjs/app/api/integrations/[provider]/disconnect/route");
  const workflow = await import("../examples/nextjs/lib/workflow");

  const anonymous = await connect.GET(new Request(`${APP}/api/integrations/acme/connect`), params("acme"));
  assert.equal(anonymous.status, 401);

  // 1. Connect: a redirect to the provider's consent page.
  const started = await connect.GET(new Request(`${APP}/api/integrations/acme/connect`, { headers: cookie }), params("acme"));
  assert.equal(started.status, 302);
  const consentUrl = started.headers.get("location")!;
  assert.ok(consentUrl.startsWith(fake.authorization_url), consentUrl);
  // The user consents; the provider redirects to the callback with state and code.
  const consent = await fetch(consentUrl, { redirect: "manual" });
  const back = consent.headers.get("location")!;
  assert.ok(back.startsWith(`${APP}/api/integrations/acme/callback?`), back);

  // 2. Callback, under another user's session: refused, nothing stored.
  const stolen = await callback.GET(new Request(back, { headers: { cookie: "uid=mallory" } }), params("acme"));
  assert.equal(new URL(stolen.headers.get("location")!).searchParams.get("error"), "AUTHORIZATION_USER_MISMATCH");
  // ... so alice starts over and completes.
  const again = await connect.GET(new Request(`${APP}/api/integrations/acme/connect`, { headers: cookie }), params("acme"));
  const code = (await fetch(again.headers.get("location")!, { redirect: "manual" })).headers.get("location")!;
  const done = await callback.GET(new Request(code, { headers: cookie }), params("acme"));
  assert.equal(done.status, 302);
  assert.equal(done.headers.get("location"), `${APP}/settings/integrations?connected=acme`);

  // 3. The settings page's list.
  const listed = (await (await list.GET(new Request(`${APP}/api/integrations`, { headers: cookie }))).json()) as {
    integrations: Array<{ provider: string; status: string; connectedAt: string }>;
  };
  assert.equal(listed.integrations.length, 1);
  assert.equal(listed.integrations[0]!.provider, "acme");
  assert.equal(listed.integrations[0]!.status, "CONNECTED");
  assert.ok(!Number.isNaN(Date.parse(listed.integrations[0]!.connectedAt)));

  // 4. A workflow step under a run grant: the provider's API through the broker.
  const grant = await workflow.startRun("alice", "run-42");
  const items = (await workflow.syncItemsStep(grant, "alice")) as { ok: boolean };
  assert.equal(items.ok, true);
  await workflow.endRun("run-42");
  await assert.rejects(workflow.syncItemsStep(grant, "alice"), { reason: "GRANT_REVOKED" });

  // 5. Disconnect.
  const gone = await disconnect.POST(new Request(`${APP}/api/integrations/acme/disconnect`, { method: "POST", headers: cookie }), params("acme"));
  assert.deepEqual(await gone.json(), { status: "DISCONNECTED", revocation: "REVOKED" });
  const missing = await disconnect.POST(new Request(`${APP}/api/integrations/nope/disconnect`, { method: "POST", headers: cookie }), params("acme-none"));
  assert.equal(missing.status, 404);
});

test("the guide shows these handlers exactly as they are", () => {
  const guide = readFileSync(join(ROOT, "docs", "node.md"), "utf8");
  const blocks = [...guide.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]);
  for (const file of FILES) {
    const text = readFileSync(join(EXAMPLE, file), "utf8");
    assert.ok(guide.includes(`\`clients/node/examples/nextjs/${file}\``), `the guide names ${file}`);
    assert.ok(blocks.includes(text), `docs/node.md has ${file} as a ts block, as it is`);
  }
});
