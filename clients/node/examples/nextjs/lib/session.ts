// The signed-in user: replace with your auth library (NextAuth's auth(), Clerk's auth(), a
// session cookie you verify...). This stand-in reads a "uid" cookie, which is enough for the
// example's test and must never be trusted as it is in production.
export async function currentUserId(request: Request): Promise<string | null> {
  const cookie = request.headers.get("cookie") ?? "";
  const match = /(?:^|;\s*)uid=([^;]+)/.exec(cookie);
  return match ? decodeURIComponent(match[1]!) : null;
}
