/** Named plain forms of the API's main messages and enums (all derived: see plain.ts). */
import type * as pb from "./gen/credentialbroker/v1/broker_pb";
import type { Plain } from "./plain";

export type Integration = Plain<pb.Integration>;
export type IntegrationEvent = Plain<pb.IntegrationEvent>;
export type Grant = Plain<pb.Grant>;
export type IntegrationStatus = Plain<pb.IntegrationStatus>;
export type IntegrationEventType = Plain<pb.IntegrationEventType>;
export type RevocationOutcome = Plain<pb.RevocationOutcome>;
export type CredentialType = Plain<pb.CredentialType>;
export type GrantState = Plain<pb.GrantState>;
