// GET /api/integrations/:provider/connect — send the user to the provider's consent page.
import { broker, callbackUrl } from "../../../../../lib/broker";
import { currentUserId } from "../../../../../lib/session";

export async function GET(
  request: Request,
  { params }: { params: Promise<{ provider: string }> },
): Promise<Response> {
  const userId = await currentUserId(request);
  if (!userId) return new Response("sign in first", { status: 401 });
  const { provider } = await params;
  const { authorizationUrl } = await broker.beginAuthorization({
    userId,
    provider,
    redirectUri: callbackUrl(provider),
  });
  return Response.redirect(authorizationUrl, 302);
}
