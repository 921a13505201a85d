// GET /api/integrations/:provider/callback?state=…&code=… — the provider sends the user back:
// the broker exchanges the code (with the PKCE verifier it kept) and stores the integration.
import { AuthorizationFlowInvalid, AuthorizationUserMismatch } from "@credential-broker/client";
import { broker } from "../../../../../lib/broker";
import { currentUserId } from "../../../../../lib/session";

export async function GET(
  request: Request,
  { params }: { params: Promise<{ provider: string }> },
): Promise<Response> {
  const { provider } = await params;
  const query = new URL(request.url).searchParams;
  const back = new URL("/settings/integrations", request.url);
  const userId = await currentUserId(request);
  if (!userId) return new Response("sign in first", { status: 401 });
  try {
    await broker.completeAuthorization({
      state: query.get("state") ?? "",
      code: query.get("code") ?? "",
      error: query.get("error") ?? "",
      errorDescription: query.get("error_description") ?? "",
      userId, // the flow is refused unless this is the user who began it
    });
    back.searchParams.set("connected", provider);
  } catch (error) {
    // A refused consent, a replayed or expired state, or another user's flow: start over.
    if (!(error instanceof AuthorizationFlowInvalid || error instanceof AuthorizationUserMismatch)) {
      throw error;
    }
    back.searchParams.set("error", error.reason);
  }
  return Response.redirect(back, 302);
}
