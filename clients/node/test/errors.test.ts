/**
 * The error mapping on its own: every reason the server can send has its class (asked of the
 * server's own error tree, broker/errors.py), and each class comes out of a status crafted the
 * way the broker encodes it (google.rpc.Status with ErrorInfo and RetryInfo).
 */
import { execFileSync } from "node:child_process";
import { strict as assert } from "node:assert";
import { test } from "node:test";
import { Metadata } from "@grpc/grpc-js";
import { create, toBinary } from "@bufbuild/protobuf";
import { anyPack, DurationSchema } from "@bufbuild/protobuf/wkt";
import * as client from "@credential-broker/client";
import { BY_REASON, BrokerError, Status, errorFromStatus } from "@credential-broker/client";
import { StatusSchema } from "../src/gen/google/rpc/status_pb";
import { ErrorInfoSchema, RetryInfoSchema } from "../src/gen/google/rpc/error_details_pb";
import { PYTHON, ROOT } from "./support/broker";

const SERVER_REASONS = `
import json
from broker import errors
def walk(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from walk(sub)
print(json.dumps(sorted({c.reason: c.code.value[0] for c in walk(errors.BrokerError)}.items())))
`;

function serverReasons(): Array<[string, number]> {
  const out = execFileSync(PYTHON, ["-c", SERVER_REASONS], { cwd: ROOT, encoding: "utf8" });
  return JSON.parse(out) as Array<[string, number]>;
}

function trailers(reason: string | undefined, retrySeconds?: number, meta = {}): Metadata {
  const details = [];
  if (reason !== undefined) {
    details.push(
      anyPack(ErrorInfoSchema, create(ErrorInfoSchema, { reason, domain: "credentialbroker", metadata: meta })),
    );
  }
  if (retrySeconds !== undefined) {
    const retryDelay = create(DurationSchema, { seconds: BigInt(Math.floor(retrySeconds)), nanos: Math.round((retrySeconds % 1) * 1e9) });
    details.push(anyPack(RetryInfoSchema, create(RetryInfoSchema, { retryDelay })));
  }
  const metadata = new Metadata();
  metadata.set("grpc-status-details-bin", Buffer.from(toBinary(StatusSchema, create(StatusSchema, { code: 0, message: "m", details }))));
  metadata.set("x-request-id", "r-1");
  return metadata;
}

test("every reason the server sends has its class, with the server's status code", () => {
  const reasons = serverReasons();
  assert.ok(reasons.length > 30, "the server's error tree was read");
  const missing = reasons.filter(([reason]) => !BY_REASON.has(reason)).map(([r]) => r);
  assert.deepEqual(missing, [], "reasons the broker sends that the Node client has no class for");
  for (const [reason, code] of reasons) {
    assert.equal(BY_REASON.get(reason)!.CODE, code, `${reason}'s code`);
  }
});

test("each class comes out of its crafted status with code, reason, metadata, retryAfterMs", () => {
  for (const [reason, cls] of BY_REASON) {
    const error = errorFromStatus(cls.CODE, "why", trailers(reason, 1.5, { integration_id: "i-1" }));
    assert.equal(error.constructor, cls, reason);
    assert.ok(error instanceof BrokerError && error instanceof Error);
    assert.equal(error.code, cls.CODE);
    assert.equal(error.reason, reason);
    assert.deepEqual({ ...error.metadata }, { integration_id: "i-1" });
    assert.equal(error.retryAfterMs, 1500);
    assert.equal(error.requestId, "r-1");
    assert.equal(error.message, "why");
    // Exported under its own name.
    assert.equal((client as unknown as Record<string, unknown>)[cls.name], cls);
  }
});

test("an unknown reason falls back to the class of its code; no details to the code's class", () => {
  const newer = errorFromStatus(Status.FAILED_PRECONDITION, "x", trailers("SOMETHING_NEW"));
  assert.ok(newer instanceof client.FailedPrecondition);
  assert.equal(newer.reason, "SOMETHING_NEW");
  const bare = errorFromStatus(Status.DEADLINE_EXCEEDED, "late", undefined, "mine");
  assert.ok(bare instanceof client.DeadlineExceeded);
  assert.equal(bare.reason, "DEADLINE_EXCEEDED");
  assert.equal(bare.requestId, "mine");
  assert.ok(errorFromStatus(Status.UNKNOWN, "?", undefined) instanceof client.Internal);
  assert.ok(errorFromStatus(Status.CANCELLED, "?", undefined) instanceof client.Cancelled);
  // A reason whose class has another code is not trusted: the code's class wins.
  const odd = errorFromStatus(Status.NOT_FOUND, "x", trailers("GRANT_EXPIRED"));
  assert.ok(odd instanceof client.NotFound && !(odd instanceof client.GrantExpired));
  // A garbled trailer does not hide the call's own error.
  const garbled = new Metadata();
  garbled.set("grpc-status-details-bin", Buffer.from([0xff, 0xff, 0xff]));
  assert.ok(errorFromStatus(Status.UNAVAILABLE, "down", garbled) instanceof client.Unavailable);
});
