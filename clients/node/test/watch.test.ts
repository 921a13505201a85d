/**
 * watchIntegrationEvents resumes by itself from its cursor when the broker restarts: every
 * event once, in order, none missed, none repeated (SQLite and PostgreSQL).
 */
import { strict as assert } from "node:assert";
import { after, before, describe, test } from "node:test";
import { BrokerClient } from "@credential-broker/client";
import type { IntegrationEvent } from "@credential-broker/client";
import { ADMIN_TOKEN, BACKENDS, BrokerProcess, eventually, skipUnless, startFakeProvider } from "./support/broker";
import type { FakeProvider } from "./support/broker";

for (const backend of BACKENDS) {
  describe(`watching events across a broker restart on ${backend}`, { skip: skipUnless(backend), timeout: 150_000 }, () => {
    let fake: FakeProvider;
    let server: BrokerProcess;
    let client: BrokerClient;

    before(async () => {
      fake = await startFakeProvider();
      server = await new BrokerProcess({ backend, fake }).start();
      client = new BrokerClient({ address: server.address, token: ADMIN_TOKEN, retry: { attempts: 20 } });
    });

    after(async () => {
      client?.close();
      await server?.dispose();
      fake?.stop();
    });

    const store = (userId: string) =>
      client.storeIntegration({ userId, provider: "keyed", credential: { apiKey: { key: "k", header: "X-Api-Key" } } });

    test("no gap and no duplicate", async () => {
      const seen: IntegrationEvent[] = [];
      const watch = client.watchIntegrationEvents({ provider: "keyed" }, { resumeForMs: 60_000 });
      const reading = (async () => {
        for await (const event of watch) {
          seen.push(event);
          if (seen.length === 6) break;
        }
      })();
      for (const user of ["w1", "w2", "w3"]) await store(user);
      await eventually(() => seen.length === 3);
      await server.restart(); // the stream ends (OK at shutdown, or drops): the watch resumes
      for (const user of ["w4", "w5", "w6"]) await store(user);
      await reading;
      assert.deepEqual(seen.map((e) => e.userId), ["w1", "w2", "w3", "w4", "w5", "w6"]);
      const ids = seen.map((e) => e.id);
      assert.deepEqual(ids, [...ids].sort((a, b) => a - b));
      assert.equal(new Set(ids).size, 6);
      // The stored events are exactly these: nothing missed in between.
      const listed = await client.listIntegrationEvents({ provider: "keyed" });
      assert.deepEqual(listed.events.map((e) => e.id), ids);
      assert.ok(seen.every((e) => e.type === "CONNECTED" && e.occurredAt instanceof Date));
    });

    test("resumes after a stop and a start, from the cursor it was given", async () => {
      const first = await client.listIntegrationEvents({ provider: "keyed" });
      const cursor = first.events.at(-1)?.id ?? 0;
      const seen: number[] = [];
      const watch = client.watchIntegrationEvents({ provider: "keyed", afterEventId: cursor });
      const reading = (async () => {
        for await (const event of watch) {
          seen.push(event.id);
          if (seen.length === 3) break;
        }
      })();
      await store("d1");
      await eventually(() => seen.length === 1);
      await server.stop();
      await server.start();
      await store("d2");
      await store("d3");
      await reading;
      const listed = await client.listIntegrationEvents({ provider: "keyed", afterEventId: cursor });
      assert.deepEqual(seen, listed.events.map((e) => e.id));
    });
  });
}
