/**
 * Every failed call rejects with one of these; the class says what happened, never a token.
 *
 * The broker answers errors with a gRPC status carrying a google.rpc.ErrorInfo (domain
 * "credentialbroker") and, for UNAVAILABLE, often a RetryInfo. The reason picks the class; a
 * reason this client does not know yet falls back to the class of the status code, so a newer
 * broker never breaks an older client's `instanceof` checks.
 *
 *     BrokerError                      .code .codeName .reason .metadata .requestId .retryAfterMs
 *     ├── InvalidArgument              INVALID_ARGUMENT (metadata.field names the field)
 *     │   └── UnknownProvider
 *     ├── NotFound: IntegrationNotFound, GrantNotFound
 *     ├── FailedPrecondition: AmbiguousIntegration, ReauthorizationRequired,
 *     │   IntegrationDisconnected, InsufficientScope, ProviderMisconfigured,
 *     │   AuthorizationFlowInvalid, ProxyNotConfigured, MinValidityUnattainable
 *     ├── Unavailable (retried): ProviderUnavailable, StorageUnavailable > AuditUnavailable
 *     ├── DataLoss: CiphertextInvalid
 *     ├── Unauthenticated: GrantInvalid, GrantExpired, GrantRevoked
 *     ├── PermissionDenied: AuthorizationUserMismatch, GrantRequired, GrantScope,
 *     │   GrantAudience, TokenExposureDenied
 *     ├── ResourceExhausted: FlowLimit, CallerStreamLimit, StreamLimit,
 *     │   ProxyRequestTooLarge, ProxyResponseTooLarge
 *     ├── DeadlineExceeded, Cancelled
 *     └── Internal (INTERNAL, UNKNOWN: a broker bug, report it)
 */
import { status as Status, Metadata } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { fromBinary } from "@bufbuild/protobuf";
import { anyIs, anyUnpack } from "@bufbuild/protobuf/wkt";
import { StatusSchema } from "./gen/google/rpc/status_pb";
import { ErrorInfoSchema, RetryInfoSchema } from "./gen/google/rpc/error_details_pb";

export { Status };

export const DOMAIN = "credentialbroker";
const DETAILS_KEY = "grpc-status-details-bin";
const REQUEST_ID_KEY = "x-request-id";

/** The name of a gRPC status code ("NOT_FOUND"). */
export function codeName(code: number): string {
  return (Status as unknown as Record<number, string>)[code] ?? `CODE_${code}`;
}

export interface BrokerErrorInit {
  code?: Status;
  reason?: string;
  metadata?: Record<string, string>;
  requestId?: string;
  retryAfterMs?: number;
}

/** A call failed. `reason` is the ErrorInfo reason (or the code's name without one). */
export class BrokerError extends Error {
  /** The gRPC status code this class stands for (compare with grpc-js's `status`). */
  static readonly CODE: Status = Status.UNKNOWN;
  /** The ErrorInfo reason this class stands for; undefined for the classes of a whole code. */
  static readonly REASON: string | undefined = undefined;

  readonly code: Status;
  readonly reason: string;
  readonly metadata: Readonly<Record<string, string>>;
  requestId: string | undefined;
  /** RetryInfo's delay, in milliseconds, when the broker sent one. */
  readonly retryAfterMs: number | undefined;

  constructor(message: string, init: BrokerErrorInit = {}) {
    super(message);
    const cls = new.target as typeof BrokerError;
    this.name = cls.name;
    this.code = init.code ?? cls.CODE;
    this.reason = init.reason ?? cls.REASON ?? codeName(this.code);
    this.metadata = Object.freeze({ ...(init.metadata ?? {}) });
    this.requestId = init.requestId;
    this.retryAfterMs = init.retryAfterMs;
  }

  get codeName(): string {
    return codeName(this.code);
  }

  override toString(): string {
    const text = `${this.name}: ${this.reason}: ${this.message}`;
    return this.requestId ? `${text} (requestId=${this.requestId})` : text;
  }
}

export class InvalidArgument extends BrokerError {
  static override readonly CODE: Status = Status.INVALID_ARGUMENT;
  static override readonly REASON: string | undefined = "INVALID_ARGUMENT";
}
export class UnknownProvider extends InvalidArgument {
  static override readonly REASON: string | undefined = "UNKNOWN_PROVIDER";
}

export class NotFound extends BrokerError {
  static override readonly CODE: Status = Status.NOT_FOUND;
}
export class IntegrationNotFound extends NotFound {
  static override readonly REASON: string | undefined = "INTEGRATION_NOT_FOUND";
}
export class GrantNotFound extends NotFound {
  static override readonly REASON: string | undefined = "GRANT_NOT_FOUND";
}

export class FailedPrecondition extends BrokerError {
  static override readonly CODE: Status = Status.FAILED_PRECONDITION;
}
export class AmbiguousIntegration extends FailedPrecondition {
  static override readonly REASON: string | undefined = "AMBIGUOUS_INTEGRATION";
}
/** The user must authorize again (refresh token rejected, or expired without one). */
export class ReauthorizationRequired extends FailedPrecondition {
  static override readonly REASON: string | undefined = "REAUTHORIZATION_REQUIRED";
}
export class IntegrationDisconnected extends FailedPrecondition {
  static override readonly REASON: string | undefined = "INTEGRATION_DISCONNECTED";
}
export class InsufficientScope extends FailedPrecondition {
  static override readonly REASON: string | undefined = "INSUFFICIENT_SCOPE";
}
export class ProviderMisconfigured extends FailedPrecondition {
  static override readonly REASON: string | undefined = "PROVIDER_MISCONFIGURED";
}
export class AuthorizationFlowInvalid extends FailedPrecondition {
  static override readonly REASON: string | undefined = "AUTHORIZATION_FLOW_INVALID";
}
/** The provider has no API base for Proxy (providers.NAME.api_base_url). */
export class ProxyNotConfigured extends FailedPrecondition {
  static override readonly REASON: string | undefined = "PROXY_NOT_CONFIGURED";
}
export class MinValidityUnattainable extends FailedPrecondition {
  static override readonly REASON: string | undefined = "MIN_VALIDITY_UNATTAINABLE";
}

/** Retried by the client within the deadline; thrown once retrying cannot help. */
export class Unavailable extends BrokerError {
  static override readonly CODE: Status = Status.UNAVAILABLE;
}
export class ProviderUnavailable extends Unavailable {
  static override readonly REASON: string | undefined = "PROVIDER_UNAVAILABLE";
}
export class StorageUnavailable extends Unavailable {
  static override readonly REASON: string | undefined = "STORAGE_UNAVAILABLE";
}
export class AuditUnavailable extends StorageUnavailable {
  static override readonly REASON: string | undefined = "AUDIT_UNAVAILABLE";
}

export class DataLoss extends BrokerError {
  static override readonly CODE: Status = Status.DATA_LOSS;
}
export class CiphertextInvalid extends DataLoss {
  static override readonly REASON: string | undefined = "CIPHERTEXT_INVALID";
}

export class Unauthenticated extends BrokerError {
  static override readonly CODE: Status = Status.UNAUTHENTICATED;
  static override readonly REASON: string | undefined = "UNAUTHENTICATED";
}
/** Not a grant token of this broker. */
export class GrantInvalid extends Unauthenticated {
  static override readonly REASON: string | undefined = "GRANT_INVALID";
}
export class GrantExpired extends Unauthenticated {
  static override readonly REASON: string | undefined = "GRANT_EXPIRED";
}
export class GrantRevoked extends Unauthenticated {
  static override readonly REASON: string | undefined = "GRANT_REVOKED";
}

export class PermissionDenied extends BrokerError {
  static override readonly CODE: Status = Status.PERMISSION_DENIED;
  static override readonly REASON: string | undefined = "PERMISSION_DENIED";
}
export class AuthorizationUserMismatch extends PermissionDenied {
  static override readonly REASON: string | undefined = "AUTHORIZATION_USER_MISMATCH";
}
export class GrantRequired extends PermissionDenied {
  static override readonly REASON: string | undefined = "GRANT_REQUIRED";
}
export class GrantScope extends PermissionDenied {
  static override readonly REASON: string | undefined = "GRANT_SCOPE";
}
export class GrantAudience extends PermissionDenied {
  static override readonly REASON: string | undefined = "GRANT_AUDIENCE";
}
/** This caller or grant may only call the provider through proxy(), never read a token. */
export class TokenExposureDenied extends PermissionDenied {
  static override readonly REASON: string | undefined = "TOKEN_EXPOSURE_DENIED";
}

/** A limit is reached; `metadata` names the `setting` and its `limit`. */
export class ResourceExhausted extends BrokerError {
  static override readonly CODE: Status = Status.RESOURCE_EXHAUSTED;
  static override readonly REASON: string | undefined = "RESOURCE_EXHAUSTED";
}
export class FlowLimit extends ResourceExhausted {
  static override readonly REASON: string | undefined = "FLOW_LIMIT";
}
export class CallerStreamLimit extends ResourceExhausted {
  static override readonly REASON: string | undefined = "CALLER_STREAM_LIMIT";
}
export class StreamLimit extends ResourceExhausted {
  static override readonly REASON: string | undefined = "STREAM_LIMIT";
}
export class ProxyRequestTooLarge extends ResourceExhausted {
  static override readonly REASON: string | undefined = "PROXY_REQUEST_TOO_LARGE";
}
export class ProxyResponseTooLarge extends ResourceExhausted {
  static override readonly REASON: string | undefined = "PROXY_RESPONSE_TOO_LARGE";
}

export class DeadlineExceeded extends BrokerError {
  static override readonly CODE: Status = Status.DEADLINE_EXCEEDED;
}
export class Cancelled extends BrokerError {
  static override readonly CODE: Status = Status.CANCELLED;
}
export class Internal extends BrokerError {
  static override readonly CODE: Status = Status.INTERNAL;
}

type ErrorClass = typeof BrokerError;

const CLASSES: ErrorClass[] = [
  InvalidArgument, UnknownProvider, NotFound, IntegrationNotFound, GrantNotFound,
  FailedPrecondition, AmbiguousIntegration, ReauthorizationRequired, IntegrationDisconnected,
  InsufficientScope, ProviderMisconfigured, AuthorizationFlowInvalid, ProxyNotConfigured,
  MinValidityUnattainable, Unavailable, ProviderUnavailable, StorageUnavailable, AuditUnavailable,
  DataLoss, CiphertextInvalid, Unauthenticated, GrantInvalid, GrantExpired, GrantRevoked,
  PermissionDenied, AuthorizationUserMismatch, GrantRequired, GrantScope, GrantAudience,
  TokenExposureDenied, ResourceExhausted, FlowLimit, CallerStreamLimit, StreamLimit,
  ProxyRequestTooLarge, ProxyResponseTooLarge, DeadlineExceeded, Cancelled, Internal,
];

/** The class of each ErrorInfo reason the broker sends. */
export const BY_REASON: ReadonlyMap<string, ErrorClass> = new Map(
  CLASSES.filter((cls) => cls.REASON !== undefined).map((cls) => [cls.REASON as string, cls]),
);

/** The class for a status code when the reason is missing or unknown: the most general one. */
export const BY_CODE: ReadonlyMap<Status, ErrorClass> = (() => {
  const map = new Map<Status, ErrorClass>();
  for (const cls of CLASSES) if (!map.has(cls.CODE)) map.set(cls.CODE, cls);
  map.set(Status.UNKNOWN, Internal);
  return map;
})();

interface Details {
  reason?: string;
  metadata?: Record<string, string>;
  retryAfterMs?: number;
}

function decodeDetails(raw: Uint8Array): Details {
  const found: Details = {};
  let status;
  try {
    status = fromBinary(StatusSchema, raw);
  } catch {
    return found; // a garbled trailer must not hide the call's own error
  }
  for (const detail of status.details) {
    if (found.reason === undefined && anyIs(detail, ErrorInfoSchema)) {
      const info = anyUnpack(detail, ErrorInfoSchema);
      if (info !== undefined && info.domain === DOMAIN) {
        found.reason = info.reason;
        found.metadata = { ...info.metadata };
      }
    } else if (found.retryAfterMs === undefined && anyIs(detail, RetryInfoSchema)) {
      const delay = anyUnpack(detail, RetryInfoSchema)?.retryDelay;
      if (delay !== undefined) {
        found.retryAfterMs = Number(delay.seconds) * 1000 + delay.nanos / 1e6;
      }
    }
  }
  return found;
}

/** The error for a status: class by ErrorInfo reason, else by status code. */
export function errorFromStatus(
  code: Status,
  message: string,
  trailers: Metadata | undefined,
  requestId?: string,
): BrokerError {
  let details: Details = {};
  let answeredId: string | undefined;
  if (trailers !== undefined) {
    const raw = trailers.get(DETAILS_KEY)[0];
    if (raw instanceof Uint8Array) details = decodeDetails(raw);
    const id = trailers.get(REQUEST_ID_KEY)[0];
    if (id !== undefined) answeredId = id.toString();
  }
  let cls = details.reason !== undefined ? BY_REASON.get(details.reason) : undefined;
  if (cls === undefined || cls.CODE !== code) cls = BY_CODE.get(code) ?? BrokerError;
  return new cls(message || codeName(code), {
    code,
    reason: details.reason,
    metadata: details.metadata,
    requestId: answeredId ?? requestId,
    retryAfterMs: details.retryAfterMs,
  });
}

/** A grpc-js failure (ServiceError or anything thrown on the way) → a BrokerError. */
export function toBrokerError(error: unknown, requestId?: string): BrokerError {
  if (error instanceof BrokerError) return error;
  const failed = error as Partial<ServiceError>;
  if (failed !== null && typeof failed === "object" && typeof failed.code === "number") {
    return errorFromStatus(failed.code, failed.details ?? "", failed.metadata, requestId);
  }
  const message = error instanceof Error ? error.message : String(error);
  return new Internal(message, { code: Status.INTERNAL, requestId });
}
