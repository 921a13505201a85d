// GET /api/integrations — the signed-in user's integrations, for the settings page.
import { broker } from "../../../lib/broker";
import { currentUserId } from "../../../lib/session";

export async function GET(request: Request): Promise<Response> {
  const userId = await currentUserId(request);
  if (!userId) return new Response("sign in first", { status: 401 });
  const integrations = [];
  for await (const integration of broker.iterIntegrations({ userId })) {
    integrations.push({
      id: integration.id,
      provider: integration.provider,
      accountId: integration.accountId,
      status: integration.status, // "CONNECTED", "NEEDS_REAUTHORIZATION", ...
      scopes: integration.scopes,
      connectedAt: integration.createdAt,
      expiresAt: integration.expiresAt ?? null,
    });
  }
  return Response.json({ integrations });
}
