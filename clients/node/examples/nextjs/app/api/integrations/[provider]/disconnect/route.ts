// POST /api/integrations/:provider/disconnect — the broker marks it DISCONNECTED, then
// revokes the grant at the provider.
import { IntegrationNotFound } from "@credential-broker/client";
import { broker } from "../../../../../lib/broker";
import { currentUserId } from "../../../../../lib/session";

export async function POST(
  request: Request,
  { params }: { params: Promise<{ provider: string }> },
): Promise<Response> {
  const userId = await currentUserId(request);
  if (!userId) return new Response("sign in first", { status: 401 });
  const { provider } = await params;
  try {
    const { integration, revocation } = await broker.disconnect({
      userId,
      provider,
      reason: "user clicked disconnect",
    });
    return Response.json({ status: integration?.status, revocation });
  } catch (error) {
    if (error instanceof IntegrationNotFound) return new Response(null, { status: 404 });
    throw error;
  }
}
