/**
 * BrokerClient: one typed async method per RPC of credentialbroker.v1.CredentialBroker, with
 * credentials, the grant header, a deadline, retries of UNAVAILABLE that honour RetryInfo, the
 * request id, and one error class per ErrorInfo reason (errors.ts).
 */
import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import * as grpc from "@grpc/grpc-js";
import type { DescMessage, DescMethod, MessageShape } from "@bufbuild/protobuf";
import type { GenService } from "@bufbuild/protobuf/codegenv2";
import { CredentialBroker } from "./gen/credentialbroker/v1/broker_pb";
import { BrokerError, Cancelled, Status, toBrokerError } from "./errors";
import { decode, encode, toPlain } from "./plain";
import type { Input, Plain } from "./plain";

type Rpcs = typeof CredentialBroker extends GenService<infer T> ? T : never;
/** The RPCs, by their lowerCamel names (storeIntegration, getAccessToken, ...). */
export type RpcName = keyof Rpcs;
/** An RPC's request, as plain values (every field optional, as in proto3). */
export type RequestOf<K extends RpcName> = Input<MessageShape<Rpcs[K]["input"]>>;
/** An RPC's response, as plain values. */
export type ResponseOf<K extends RpcName> = Plain<MessageShape<Rpcs[K]["output"]>>;

export const GRANT_HEADER = "x-broker-grant";
export const REQUEST_ID_HEADER = "x-request-id";
export const DEFAULT_DEADLINE_MS = 30_000;

/** TLS to the broker; with certChain and privateKey it is mTLS (the certificate's SAN is the
 * caller's identity, no token needed). PEM as a string or bytes. */
export interface TlsOptions {
  /** The CA that signed the broker's certificate; absent: the system's roots. */
  rootCerts?: string | Uint8Array;
  certChain?: string | Uint8Array;
  privateKey?: string | Uint8Array;
  /** The name expected in the broker's certificate, if not the address's host. */
  serverName?: string;
}

/** Retries of UNAVAILABLE only, always inside the call's deadline. The wait is the broker's
 * RetryInfo delay when it sends one, else exponential backoff with full jitter. */
export interface RetryOptions {
  /** Attempts in total, the first included (5); 1 switches retries off. */
  attempts?: number;
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  multiplier?: number;
}

export interface BrokerClientOptions {
  /** host:port of the broker (or unix:/path). */
  address: string;
  /** The caller's bearer token (not needed with mTLS). */
  token?: string;
  tls?: TlsOptions;
  /** A run-scoped grant token, sent as x-broker-grant on every call (see withGrant). */
  grant?: string;
  /** Each unary call's default deadline, retries included (30 s); null: none. */
  deadlineMs?: number | null;
  retry?: RetryOptions;
  /** Plaintext goes to loopback only unless this is true (behind a mesh that encrypts). */
  allowInsecure?: boolean;
  /** grpc-js channel options. */
  channelOptions?: grpc.ChannelOptions;
}

export interface CallOptions {
  /** This call's deadline in milliseconds, retries included; null: none. */
  deadlineMs?: number | null;
  /** Sent as x-request-id (generated when absent), the same on every attempt. */
  requestId?: string;
  /** This call's x-broker-grant, instead of the client's. */
  grant?: string;
  /** Other metadata. */
  headers?: Record<string, string>;
  /** Cancels the call (it then rejects with Cancelled). */
  signal?: AbortSignal;
}

export interface WatchOptions extends Omit<CallOptions, "deadlineMs"> {
  /** Give up when the broker could not be reached again for this long (60 s); the last
   * UNAVAILABLE error is thrown. */
  resumeForMs?: number;
}

type Query = Record<string, string> | ReadonlyArray<readonly [string, string]>;

/** proxy(): the request to the provider's API, sent by the broker with the integration's
 * credential (which never reaches this process). */
export interface ProxyInput {
  integrationId?: string;
  userId?: string;
  provider?: string;
  accountId?: string;
  /** Relative to the provider's API base, e.g. "/v1/users/me". */
  path: string;
  /** GET unless given. */
  method?: string;
  query?: Query;
  /** HTTP headers for the provider. */
  requestHeaders?: Record<string, string>;
  body?: Uint8Array | string;
  /** Sent as the body, with Content-Type: application/json. */
  json?: unknown;
  /** One of the provider's other API hosts (providers.NAME.api_hosts). */
  apiHost?: string;
}

/** The provider's answer as it came, errors included (a 429 or 503 is not thrown). */
export class ProxyResponse {
  constructor(
    readonly status: number,
    /** Lower-case names. */
    readonly headers: Record<string, string>,
    readonly body: Uint8Array,
    /** Whether the broker refreshed the token for this call. */
    readonly refreshed: boolean,
  ) {}

  get ok(): boolean {
    return this.status >= 200 && this.status < 300;
  }

  text(): string {
    return new TextDecoder().decode(this.body);
  }

  json(): unknown {
    return JSON.parse(this.text());
  }
}

// Methods whose replay cannot do twice what was done once: only these are retried by proxy()
// when the broker answers UNAVAILABLE (a POST may have reached the provider).
const IDEMPOTENT = new Set(["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]);
const LOOPBACK = new Set(["127.0.0.1", "localhost", "::1", "[::1]"]);

function checkAddress(address: string, tls: TlsOptions | undefined, allowInsecure: boolean): void {
  if (tls !== undefined || allowInsecure || address.startsWith("unix:")) return;
  const target = address.includes("///") ? address.split("///").pop()! : address;
  let host = target;
  if (target.startsWith("[")) host = target.slice(0, target.indexOf("]") + 1);
  else if (target.split(":").length === 2) host = target.slice(0, target.lastIndexOf(":"));
  if (!LOOPBACK.has(host) && !host.startsWith("127.")) {
    throw new Error(
      `${address} is not a loopback address: pass tls: {...}, or allowInsecure: true behind a ` +
        "mesh that encrypts",
    );
  }
}

function bytes(value: string | Uint8Array | undefined): Buffer | null {
  if (value === undefined) return null;
  return typeof value === "string" ? Buffer.from(value) : Buffer.from(value);
}

interface Shared {
  channel: grpc.Client;
  token: string | undefined;
  deadlineMs: number | null;
  retry: Required<RetryOptions>;
}

export class BrokerClient {
  private readonly shared: Shared;
  private readonly grant: string | undefined;
  private readonly ownsChannel: boolean;

  constructor(options: BrokerClientOptions);
  /** @internal */
  constructor(options: BrokerClientOptions | { shared: Shared; grant: string | undefined });
  constructor(options: BrokerClientOptions | { shared: Shared; grant: string | undefined }) {
    if ("shared" in options) {
      this.shared = options.shared;
      this.grant = options.grant;
      this.ownsChannel = false;
      return;
    }
    const { address, tls, allowInsecure = false } = options;
    checkAddress(address, tls, allowInsecure);
    if (tls !== undefined && (tls.certChain === undefined) !== (tls.privateKey === undefined)) {
      throw new Error("tls: give certChain and privateKey together (mTLS)");
    }
    const credentials =
      tls === undefined
        ? grpc.credentials.createInsecure()
        : grpc.credentials.createSsl(
            bytes(tls.rootCerts),
            bytes(tls.privateKey),
            bytes(tls.certChain),
          );
    const channelOptions: grpc.ChannelOptions = {
      // A restarted broker is found again quickly (grpc-js waits up to 2 minutes by default).
      "grpc.initial_reconnect_backoff_ms": 200,
      "grpc.max_reconnect_backoff_ms": 5_000,
      ...(tls?.serverName ? { "grpc.ssl_target_name_override": tls.serverName } : {}),
      ...options.channelOptions,
    };
    const retry = options.retry ?? {};
    if (retry.attempts !== undefined && retry.attempts < 1) {
      throw new Error("retry.attempts must be at least 1");
    }
    this.shared = {
      channel: new grpc.Client(address, credentials, channelOptions),
      token: options.token,
      deadlineMs: options.deadlineMs === undefined ? DEFAULT_DEADLINE_MS : options.deadlineMs,
      retry: {
        attempts: retry.attempts ?? 5,
        initialBackoffMs: retry.initialBackoffMs ?? 100,
        maxBackoffMs: retry.maxBackoffMs ?? 5_000,
        multiplier: retry.multiplier ?? 2,
      },
    };
    this.grant = options.grant;
    this.ownsChannel = true;
  }

  /** The same client (same channel) presenting `grant` as x-broker-grant, e.g. one per
   * workflow run; closing it closes nothing. */
  withGrant(grant: string | undefined): BrokerClient {
    return new BrokerClient({ shared: this.shared, grant });
  }

  /** Closes the channel (not for a client made by withGrant). */
  close(): void {
    if (this.ownsChannel) this.shared.channel.close();
  }

  toString(): string {
    return `BrokerClient(token=${this.shared.token ? "***" : "none"}, grant=${this.grant ? "***" : "none"})`;
  }

  // -- the RPCs ----------------------------------------------------------------------------

  /** Create or update the integration for (userId, provider, accountId): OAuth tokens, or one
   * `credential` of another kind, e.g. `credential: { apiKey: { key, header: "X-Api-Key" } }`. */
  storeIntegration(request: RequestOf<"storeIntegration">, options?: CallOptions) {
    return this.call("storeIntegration", request, options);
  }

  /** An access token valid for at least `minValidFor` seconds, refreshed by the broker if
   * needed. Select by integrationId, or userId + provider (+ accountId). */
  getAccessToken(request: RequestOf<"getAccessToken">, options?: CallOptions) {
    return this.call("getAccessToken", request, options);
  }

  /** Disconnect an integration; revokes at the provider unless skipProviderRevocation. */
  disconnect(request: RequestOf<"disconnect">, options?: CallOptions) {
    return this.call("disconnect", request, options);
  }

  getIntegration(request: RequestOf<"getIntegration">, options?: CallOptions) {
    return this.call("getIntegration", request, options);
  }

  /** One page of a user's integrations; `nextPageToken` asks for the next. */
  listIntegrations(request: RequestOf<"listIntegrations">, options?: CallOptions) {
    return this.call("listIntegrations", request, options);
  }

  /** Every integration of a user, page after page. */
  async *iterIntegrations(request: RequestOf<"listIntegrations">, options?: CallOptions) {
    let pageToken = request.pageToken ?? "";
    do {
      const page = await this.listIntegrations({ ...request, pageToken }, options);
      yield* page.integrations;
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** Start an authorization-code + PKCE flow: redirect the user to `authorizationUrl`. */
  beginAuthorization(request: RequestOf<"beginAuthorization">, options?: CallOptions) {
    return this.call("beginAuthorization", request, options);
  }

  /** Finish the flow with the callback's state and code (or error), and `userId`: the user of
   * the session that received the callback. Stores the integration. */
  completeAuthorization(request: RequestOf<"completeAuthorization">, options?: CallOptions) {
    return this.call("completeAuthorization", request, options);
  }

  /** A run-scoped grant for one user's integrations; its `grantToken` is shown once. Hand it
   * to the workflow runner, which calls `withGrant(grantToken)`. `ttl` in seconds. */
  createGrant(request: RequestOf<"createGrant">, options?: CallOptions) {
    return this.call("createGrant", request, options);
  }

  revokeGrant(request: RequestOf<"revokeGrant">, options?: CallOptions) {
    return this.call("revokeGrant", request, options);
  }

  getGrant(request: RequestOf<"getGrant">, options?: CallOptions) {
    return this.call("getGrant", request, options);
  }

  listGrants(request: RequestOf<"listGrants">, options?: CallOptions) {
    return this.call("listGrants", request, options);
  }

  /** One page of stored integration events after a cursor, oldest first. */
  listIntegrationEvents(request: RequestOf<"listIntegrationEvents">, options?: CallOptions) {
    return this.call("listIntegrationEvents", request, options);
  }

  /**
   * Integration events after `afterEventId` (0: the oldest retained), then live, as an async
   * iterator. When the stream drops (the broker restarts, the network fails, the broker shuts
   * down) it resumes by itself after the last event it yielded: every event arrives once, in id
   * order. Heartbeats are consumed here. `break` out of the loop (or abort `signal`) to stop.
   */
  async *watchIntegrationEvents(
    request: RequestOf<"watchIntegrationEvents">,
    options: WatchOptions = {},
  ): AsyncGenerator<ResponseOf<"listIntegrationEvents">["events"][number], void, undefined> {
    const method = CredentialBroker.method.watchIntegrationEvents;
    const resumeForMs = options.resumeForMs ?? 60_000;
    let cursor = request.afterEventId ?? 0;
    let failures = 0;
    let unreachableSince: number | undefined;
    for (;;) {
      const requestId = options.requestId ?? randomUUID();
      const metadata = this.metadata(requestId, options);
      const stream = this.shared.channel.makeServerStreamRequest(
        path(method),
        (value: unknown) => Buffer.from(encode(method.input, value)),
        (raw: Buffer) => decode(method.output, raw),
        { ...request, afterEventId: cursor },
        metadata,
        {},
      );
      const abort = () => stream.cancel();
      options.signal?.addEventListener("abort", abort, { once: true });
      let error: BrokerError | undefined;
      let received = false;
      try {
        for await (const message of stream as AsyncIterable<MessageShape<typeof method.output>>) {
          received = true;
          unreachableSince = undefined;
          failures = 0;
          if (message.item.case === "event") {
            const event = toPlain(method.output.field.event!.message!, message.item.value) as {
              id: number;
            };
            if (event.id <= cursor) continue; // never again what was yielded
            cursor = event.id;
            yield event as never;
          }
        }
      } catch (caught) {
        error = toBrokerError(caught, requestId);
      } finally {
        options.signal?.removeEventListener("abort", abort);
        stream.cancel();
      }
      if (options.signal?.aborted) {
        throw new Cancelled("watch aborted", { code: Status.CANCELLED, requestId });
      }
      // Ended with OK (the broker shuts down) or dropped: resume from the cursor.
      if (error !== undefined && error.code !== Status.UNAVAILABLE) throw error;
      if (!received) {
        unreachableSince ??= Date.now();
        failures += 1;
        if (Date.now() - unreachableSince > resumeForMs) {
          throw error ?? new BrokerError("the event stream keeps ending", { code: Status.UNAVAILABLE });
        }
      }
      await sleep(this.backoff(failures, undefined), undefined, { signal: options.signal }).catch(
        () => undefined,
      );
    }
  }

  /**
   * Have the broker call the provider's API with the integration's credential, which never
   * reaches this process. The provider's answer comes back as it is, errors included (check
   * `status`). Only idempotent methods are retried on UNAVAILABLE.
   */
  async proxy(input: ProxyInput, options?: CallOptions): Promise<ProxyResponse> {
    const { json, query, body, method, ...rest } = input;
    const verb = (method ?? "GET").toUpperCase();
    const headers = { ...(input.requestHeaders ?? {}) };
    let payload: Uint8Array | string | undefined = body;
    if (json !== undefined) {
      if (body !== undefined) throw new TypeError("proxy: give body or json, not both");
      payload = JSON.stringify(json);
      if (!Object.keys(headers).some((name) => name.toLowerCase() === "content-type")) {
        headers["Content-Type"] = "application/json";
      }
    }
    const pairs = query === undefined ? [] : Array.isArray(query) ? query : Object.entries(query);
    const request: RequestOf<"proxy"> = {
      ...rest,
      method: verb,
      requestHeaders: headers,
      query: pairs.map(([name, value]) => ({ name, value })),
      ...(payload === undefined
        ? {}
        : { body: typeof payload === "string" ? new TextEncoder().encode(payload) : payload }),
    };
    const answer = await this.call("proxy", request, options, IDEMPOTENT.has(verb));
    return new ProxyResponse(answer.status, answer.headers, answer.body, answer.refreshed);
  }

  // -- any unary RPC ---------------------------------------------------------------------------

  /** Call unary RPC `name` with this client's credentials, deadline, retries and errors. */
  async call<K extends RpcName>(
    name: K,
    request: RequestOf<K>,
    options: CallOptions = {},
    retried = true,
  ): Promise<ResponseOf<K>> {
    const method = CredentialBroker.method[name] as DescMethod;
    if (method.methodKind !== "unary") throw new TypeError(`${String(name)} is not unary`);
    const payload = Buffer.from(encode(method.input, request)); // bad input throws here, unsent
    const requestId = options.requestId ?? randomUUID();
    const metadata = this.metadata(requestId, options);
    const deadlineMs = options.deadlineMs === undefined ? this.shared.deadlineMs : options.deadlineMs;
    const deadline = deadlineMs === null ? undefined : Date.now() + deadlineMs;
    const attempts = retried ? this.shared.retry.attempts : 1;
    for (let attempt = 1; ; attempt += 1) {
      try {
        const message = await this.unary(method, payload, metadata, deadline, options.signal);
        return toPlain(method.output, message) as ResponseOf<K>;
      } catch (caught) {
        const error = toBrokerError(caught, requestId);
        if (error.code !== Status.UNAVAILABLE || attempt >= attempts || options.signal?.aborted) {
          throw error;
        }
        const wait = this.backoff(attempt, error.retryAfterMs);
        // A retry that could not start before the deadline is not made: the UNAVAILABLE error
        // (with its retryAfterMs) says more than a DEADLINE_EXCEEDED would.
        if (deadline !== undefined && Date.now() + wait >= deadline) throw error;
        await sleep(wait);
      }
    }
  }

  private unary(
    method: DescMethod,
    payload: Buffer,
    metadata: grpc.Metadata,
    deadline: number | undefined,
    signal: AbortSignal | undefined,
  ): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const call = this.shared.channel.makeUnaryRequest(
        path(method),
        (value: Buffer) => value,
        (raw: Buffer) => decode(method.output as DescMessage, raw),
        payload,
        metadata,
        deadline === undefined ? {} : { deadline },
        (error, value) => {
          signal?.removeEventListener("abort", abort);
          if (error) reject(error);
          else resolve(value);
        },
      );
      const abort = () => call.cancel();
      if (signal?.aborted) call.cancel();
      else signal?.addEventListener("abort", abort, { once: true });
    });
  }

  private metadata(requestId: string, options: CallOptions): grpc.Metadata {
    const metadata = new grpc.Metadata();
    metadata.set(REQUEST_ID_HEADER, requestId);
    if (this.shared.token) metadata.set("authorization", `Bearer ${this.shared.token}`);
    const grant = options.grant ?? this.grant;
    if (grant) metadata.set(GRANT_HEADER, grant);
    for (const [key, value] of Object.entries(options.headers ?? {})) metadata.set(key, value);
    return metadata;
  }

  private backoff(attempt: number, retryAfterMs: number | undefined): number {
    if (retryAfterMs !== undefined) return retryAfterMs;
    const { initialBackoffMs, maxBackoffMs, multiplier } = this.shared.retry;
    const ceiling = Math.min(maxBackoffMs, initialBackoffMs * multiplier ** Math.max(0, attempt - 1));
    return Math.random() * ceiling;
  }
}

function path(method: DescMethod): string {
  return `/${method.parent.typeName}/${method.name}`;
}
