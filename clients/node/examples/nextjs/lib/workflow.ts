// A workflow run: the orchestrator (with the web app's caller) creates a grant for the run's
// user; the step runs with the runner's own caller (configured requires_grant) under that grant,
// which reaches only this user's integrations of these providers, until the run ends.
import { BrokerClient, ReauthorizationRequired } from "@credential-broker/client";
import { broker } from "./broker";

export async function startRun(userId: string, runId: string): Promise<string> {
  const { grantToken } = await broker.createGrant({
    userId,
    providers: ["acme"],
    ttl: 15 * 60, // seconds
    runId,
  });
  return grantToken; // hand it to the runner with the job, never log it
}

const runnerClient = new BrokerClient({
  address: process.env.BROKER_ADDRESS ?? "127.0.0.1:50051",
  token: process.env.BROKER_RUNNER_TOKEN,
});

export async function syncItemsStep(grantToken: string, userId: string): Promise<unknown> {
  const runner = runnerClient.withGrant(grantToken);
  try {
    // The broker calls the provider's API with the user's token, which never reaches the runner.
    const answer = await runner.proxy({ userId, provider: "acme", path: "/v1/items" });
    if (!answer.ok) throw new Error(`provider answered ${answer.status}`);
    return answer.json();
  } catch (error) {
    if (error instanceof ReauthorizationRequired) {
      // Ask the user to connect again (the settings page shows NEEDS_REAUTHORIZATION).
      return null;
    }
    throw error;
  }
}

export async function endRun(runId: string): Promise<void> {
  await broker.revokeGrant({ runId });
}

export function closeRunner(): void {
  runnerClient.close();
}
