import { BrokerClient } from "@credential-broker/client";

// One client per server process: it keeps one HTTP/2 connection to the broker. Kept on
// globalThis so that Next.js's hot reload in development does not open a new one each time.
const cached = globalThis as typeof globalThis & { broker?: BrokerClient };

export const broker = (cached.broker ??= new BrokerClient({
  address: process.env.BROKER_ADDRESS ?? "127.0.0.1:50051",
  token: process.env.BROKER_TOKEN,
}));

// Where the provider sends the user back: one of the provider's redirect_uris in the broker's
// configuration, e.g. https://app.example.com/api/integrations/google/callback.
export function callbackUrl(provider: string): string {
  return `${process.env.APP_URL}/api/integrations/${provider}/callback`;
}
