/**
 * Plain JavaScript values in, plain values out, for every message of the broker's API, derived
 * from the generated descriptors (src/gen, `make proto`) rather than written per message: a field
 * or an enum value added to protos/ shows up here after regeneration, with no edit.
 *
 * - google.protobuf.Timestamp ↔ Date
 * - google.protobuf.Duration ↔ a number of seconds
 * - google.protobuf.Struct ↔ a JSON object
 * - int64 ↔ number (ids and seconds stay far below 2^53)
 * - enums ↔ their value names without the enum's prefix: "CONNECTED" for
 *   INTEGRATION_STATUS_CONNECTED (requests also take the full name or the number)
 * - bytes ↔ Uint8Array
 * - a oneof ↔ one property per member, set for the member that is set:
 *   `credential: { apiKey: { key, header } }`
 */
import { create, toBinary, fromBinary } from "@bufbuild/protobuf";
import type {
  DescEnum,
  DescField,
  DescMessage,
  JsonObject,
  MessageShape,
} from "@bufbuild/protobuf";
import type { Duration, Timestamp } from "@bufbuild/protobuf/wkt";
import * as broker from "./gen/credentialbroker/v1/broker_pb";

// -- types -------------------------------------------------------------------------------------

type Module = typeof broker;
type Equals<A, B> =
  (<G>() => G extends A ? 1 : 2) extends <G>() => G extends B ? 1 : 2 ? true : false;
/** The value names (prefix stripped) of a generated enum type, found among the generated
 * module's enum objects; never for a plain number. */
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
type EnumNames<E> = {
  [K in keyof Module]: Module[K] extends object
    ? Same<Module[K][keyof Module[K]], E> extends true
      ? keyof Module[K] & string
      : never
    : never;
}[keyof Module];
// A plain number (int32) is told apart from an enum strictly: numbers are assignable to enums.
type EnumOrNumber<T> =
  Equals<T, number> extends true ? number : [EnumNames<T>] extends [never] ? number : EnumNames<T>;

type OneofAdt = { case: string | undefined; value?: unknown };
type UnionToIntersection<U> = (U extends unknown ? (x: U) => void : never) extends (
  x: infer I,
) => void
  ? I
  : never;
type OneofObject<U> = {
  [P in U as P extends { case: infer C extends string } ? C : never]?: P extends {
    value: infer V;
  }
    ? Plain<V>
    : never;
};
type OneofFields<M> = UnionToIntersection<
  { [K in keyof M]-?: [M[K]] extends [OneofAdt] ? OneofObject<M[K]> : never }[keyof M]
>;
type PlainMessage<M> = {
  [K in keyof M as K extends `$${string}` ? never : [M[K]] extends [OneofAdt] ? never : K]: Plain<
    M[K]
  >;
} & OneofFields<M>;

type PlainEach<T> = T extends Timestamp
  ? Date
  : T extends Duration
    ? number
    : T extends Uint8Array
      ? Uint8Array
      : T extends bigint
        ? number
        : T extends readonly (infer E)[]
          ? Plain<E>[]
          : T extends { $typeName: string }
            ? PlainMessage<T>
            : T extends object
              ? { [K in keyof T]: Plain<T[K]> }
              : T;

/** The plain JavaScript form of a generated message type (or of one of its field types). */
export type Plain<T> = [Exclude<T, undefined>] extends [never]
  ? T
  : [Exclude<T, undefined>] extends [number]
    ? EnumOrNumber<Exclude<T, undefined>> | (undefined extends T ? undefined : never)
    : PlainEach<T>;

type DeepPartial<T> = T extends Date | Uint8Array | string | number | boolean
  ? T
  : T extends readonly (infer E)[]
    ? DeepPartial<E>[]
    : T extends object
      ? { [K in keyof T]?: DeepPartial<T[K]> }
      : T;

/** What a request of that message type takes: its plain form, every field optional (proto3),
 * enums by name. */
export type Input<M> = DeepPartial<Plain<M>>;

// -- values ------------------------------------------------------------------------------------

const TIMESTAMP = "google.protobuf.Timestamp";
const DURATION = "google.protobuf.Duration";
const STRUCT = "google.protobuf.Struct";

/** An enum value's name without the prefix its values share (CONNECTED). */
export function enumName(desc: DescEnum, value: number): string {
  const found = desc.value[value];
  if (found === undefined) return String(value); // a value newer than this client
  return stripPrefix(desc, found.name);
}

function stripPrefix(desc: DescEnum, name: string): string {
  const prefix = desc.sharedPrefix;
  if (prefix && name.toLowerCase().startsWith(prefix.toLowerCase())) {
    return name.slice(prefix.length);
  }
  return name;
}

function enumNumber(desc: DescEnum, value: unknown, path: string): number {
  if (typeof value === "number" && Number.isInteger(value)) return value;
  if (typeof value === "string") {
    for (const candidate of desc.values) {
      if (candidate.name === value || stripPrefix(desc, candidate.name) === value) {
        return candidate.number;
      }
    }
  }
  const names = desc.values.map((v) => JSON.stringify(stripPrefix(desc, v.name))).join(", ");
  throw new TypeError(`${path}: ${JSON.stringify(value)} is not one of ${names}`);
}

type AnyRecord = Record<string, unknown>;

/** A decoded message → its plain form. */
export function toPlain(desc: DescMessage, message: unknown): AnyRecord {
  const source = message as AnyRecord;
  const out: AnyRecord = {};
  for (const field of desc.fields) {
    let value: unknown;
    if (field.oneof !== undefined) {
      const adt = source[field.oneof.localName] as OneofAdt | undefined;
      if (adt?.case !== field.localName) continue;
      value = adt.value;
    } else {
      value = source[field.localName];
    }
    if (value === undefined) continue;
    out[field.localName] = plainField(field, value);
  }
  return out;
}

function plainField(field: DescField, value: unknown): unknown {
  switch (field.fieldKind) {
    case "scalar":
      return plainScalar(value);
    case "enum":
      return enumName(field.enum, value as number);
    case "message":
      return plainMessageValue(field.message, value);
    case "list":
      return (value as unknown[]).map((item) =>
        field.listKind === "enum"
          ? enumName(field.enum, item as number)
          : field.listKind === "message"
            ? plainMessageValue(field.message, item)
            : plainScalar(item),
      );
    case "map": {
      const out: AnyRecord = {};
      for (const [key, item] of Object.entries(value as AnyRecord)) {
        out[key] =
          field.mapKind === "enum"
            ? enumName(field.enum, item as number)
            : field.mapKind === "message"
              ? plainMessageValue(field.message, item)
              : plainScalar(item);
      }
      return out;
    }
  }
}

function plainScalar(value: unknown): unknown {
  return typeof value === "bigint" ? Number(value) : value;
}

function plainMessageValue(desc: DescMessage, value: unknown): unknown {
  if (desc.typeName === TIMESTAMP) {
    const ts = value as Timestamp;
    return new Date(Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1_000_000));
  }
  if (desc.typeName === DURATION) {
    const d = value as Duration;
    return Number(d.seconds) + d.nanos / 1e9;
  }
  if (desc.typeName === STRUCT) return value as JsonObject; // already plain in protobuf-es
  return toPlain(desc, value);
}

/** A plain request (fields by their camelCase names) → protobuf-es init values. */
export function fromPlain(desc: DescMessage, plain: unknown, path = desc.name): AnyRecord {
  if (plain === null || typeof plain !== "object" || Array.isArray(plain)) {
    throw new TypeError(`${path}: expected an object`);
  }
  const source = plain as AnyRecord;
  const fields = new Map(desc.fields.map((f) => [f.localName, f] as const));
  const init: AnyRecord = {};
  for (const [key, value] of Object.entries(source)) {
    const field = fields.get(key);
    if (field === undefined) {
      const known = [...fields.keys()].join(", ");
      throw new TypeError(`${desc.name} has no field ${JSON.stringify(key)} (fields: ${known})`);
    }
    if (value === undefined) continue;
    const converted = initField(field, value, `${path}.${key}`);
    if (field.oneof !== undefined) {
      const taken = init[field.oneof.localName] as OneofAdt | undefined;
      if (taken !== undefined) {
        throw new TypeError(`${path}: give one of ${field.oneof.fields.map((f) => f.localName).join(", ")}`);
      }
      init[field.oneof.localName] = { case: field.localName, value: converted };
    } else {
      init[key] = converted;
    }
  }
  return init;
}

function initField(field: DescField, value: unknown, path: string): unknown {
  switch (field.fieldKind) {
    case "scalar":
      return initScalar(field.scalar, value, path);
    case "enum":
      return enumNumber(field.enum, value, path);
    case "message":
      return initMessageValue(field.message, value, path);
    case "list": {
      if (!Array.isArray(value)) throw new TypeError(`${path}: expected an array`);
      return value.map((item, i) =>
        field.listKind === "enum"
          ? enumNumber(field.enum, item, `${path}[${i}]`)
          : field.listKind === "message"
            ? initMessageValue(field.message, item, `${path}[${i}]`)
            : initScalar(field.scalar, item, `${path}[${i}]`),
      );
    }
    case "map": {
      const out: AnyRecord = {};
      const entries = value instanceof Map ? [...value.entries()] : Object.entries(value as AnyRecord);
      for (const [key, item] of entries) {
        out[String(key)] =
          field.mapKind === "enum"
            ? enumNumber(field.enum, item, `${path}.${key}`)
            : field.mapKind === "message"
              ? initMessageValue(field.message, item, `${path}.${key}`)
              : initScalar(field.scalar, item, `${path}.${key}`);
      }
      return out;
    }
  }
}

// ScalarType numbers (descriptor.proto): INT64 3, UINT64 4, FIXED64 6, SFIXED64 16, SINT64 18.
const INT64_TYPES = new Set([3, 4, 6, 16, 18]);
const BYTES = 12;

function initScalar(scalar: number, value: unknown, path: string): unknown {
  if (INT64_TYPES.has(scalar) && typeof value === "number") {
    if (!Number.isInteger(value)) throw new TypeError(`${path}: expected an integer`);
    return BigInt(value);
  }
  if (scalar === BYTES && typeof value === "string") return new TextEncoder().encode(value);
  return value;
}

function initMessageValue(desc: DescMessage, value: unknown, path: string): unknown {
  if (desc.typeName === TIMESTAMP) {
    if (!(value instanceof Date) || Number.isNaN(value.getTime())) {
      throw new TypeError(`${path}: expected a valid Date`);
    }
    const ms = value.getTime();
    const seconds = Math.floor(ms / 1000);
    return { seconds: BigInt(seconds), nanos: (ms - seconds * 1000) * 1_000_000 };
  }
  if (desc.typeName === DURATION) {
    if (typeof value !== "number" || !Number.isFinite(value)) {
      throw new TypeError(`${path}: expected a number of seconds`);
    }
    const seconds = Math.trunc(value);
    return { seconds: BigInt(seconds), nanos: Math.round((value - seconds) * 1e9) };
  }
  if (desc.typeName === STRUCT) return value;
  return fromPlain(desc, value, path);
}

/** A plain request → the wire bytes of message type ``desc``. */
export function encode(desc: DescMessage, plain: unknown): Uint8Array {
  const message = create(desc, fromPlain(desc, plain) as never) as MessageShape<DescMessage>;
  return toBinary(desc, message);
}

/** Wire bytes → the decoded protobuf-es message (converted with toPlain where needed). */
export function decode(desc: DescMessage, bytes: Uint8Array): MessageShape<DescMessage> {
  return fromBinary(desc, bytes);
}
