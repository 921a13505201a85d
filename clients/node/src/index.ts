export { BrokerClient, ProxyResponse, DEFAULT_DEADLINE_MS, GRANT_HEADER, REQUEST_ID_HEADER } from "./client";
export type {
  BrokerClientOptions,
  CallOptions,
  ProxyInput,
  RequestOf,
  ResponseOf,
  RetryOptions,
  RpcName,
  TlsOptions,
  WatchOptions,
} from "./client";
export * from "./errors";
export type { Input, Plain } from "./plain";
export * from "./types";
