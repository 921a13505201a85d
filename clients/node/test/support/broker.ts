/**
 * Real parts for the Node client's tests: `broker serve` processes (from the repository's
 * .venv) on SQLite or a fresh PostgreSQL database, and the fake provider (fake_provider.py: the
 * dev tools' fake OAuth server and provider API), steered over HTTP.
 */
import { spawn, execFileSync } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";

export const ROOT = resolve(__dirname, "..", "..", "..", "..", "..");
export const NODE_CLIENT = join(ROOT, "clients", "node");
export const VENV_BIN = join(ROOT, ".venv", "bin");
export const PYTHON = join(VENV_BIN, "python");
export const BROKER = join(VENV_BIN, "broker");
export const ADMIN_TOKEN = "node-admin-token";
export const RUNNER_TOKEN = "node-runner-token";
export const PROXY_TOKEN = "node-proxy-token";
export const PG_URL = process.env.BROKER_TEST_DATABASE_URL;
export const BACKENDS: Backend[] = ["sqlite", "postgres"];

export type Backend = "sqlite" | "postgres";

const sha256 = (text: string) => createHash("sha256").update(text).digest("hex");

export function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => (typeof address === "object" && address ? done(address.port) : fail()));
    });
  });
}

/** Whether this run may use PostgreSQL (BROKER_TEST_DATABASE_URL, as for pytest). */
export function skipUnless(backend: Backend): string | false {
  return backend === "postgres" && !PG_URL
    ? "set BROKER_TEST_DATABASE_URL to run the PostgreSQL tests"
    : false;
}

function psql(sql: string): void {
  const url = new URL(PG_URL!.replace(/^postgresql\+asyncpg:/, "postgresql:"));
  execFileSync("psql", ["-h", url.hostname, "-p", url.port || "5432", "-U", url.username || "postgres", "-d", url.pathname.slice(1) || "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-c", sql], {
    env: { ...process.env, PGPASSWORD: decodeURIComponent(url.password) },
    stdio: ["ignore", "ignore", "inherit"],
  });
}

/** A fresh database URL for one broker (or one group of replicas). */
export function newDatabase(backend: Backend, dir: string): { url: string; drop: () => void } {
  if (backend === "sqlite") {
    return { url: `sqlite+aiosqlite:///${join(dir, "broker.db")}`, drop: () => undefined };
  }
  const name = `node_client_${randomBytes(5).toString("hex")}`;
  psql(`CREATE DATABASE "${name}"`);
  const url = new URL(PG_URL!.replace(/^postgresql\+asyncpg:/, "postgresql:"));
  url.pathname = `/${name}`;
  return {
    url: url.toString().replace(/^postgresql:/, "postgresql+asyncpg:"),
    drop: () => psql(`DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`),
  };
}

export interface FakeProvider {
  url: string;
  token_url: string;
  authorization_url: string;
  revocation_url: string;
  client_id: string;
  client_secret: string;
  api_url: string;
  stop(): void;
  control(path: string): Promise<Record<string, unknown>>;
  grant(expiresIn?: number): Promise<{ access_token: string; refresh_token: string }>;
}

export async function startFakeProvider(): Promise<FakeProvider> {
  const child = spawn(PYTHON, [join(NODE_CLIENT, "test", "support", "fake_provider.py")], {
    stdio: ["pipe", "pipe", "inherit"],
  });
  const line = await new Promise<string>((done, fail) => {
    const lines = createInterface({ input: child.stdout! });
    lines.once("line", done);
    child.once("exit", (code) => fail(new Error(`fake provider exited (${code})`)));
  });
  const info = JSON.parse(line) as Omit<FakeProvider, "stop" | "control" | "grant">;
  const control = async (path: string) => {
    const answer = await fetch(info.url + path);
    if (!answer.ok) throw new Error(`fake provider ${path}: ${answer.status}`);
    return (await answer.json()) as Record<string, unknown>;
  };
  return {
    ...info,
    stop: () => {
      child.stdin!.end();
      child.kill();
    },
    control,
    grant: async (expiresIn?: number) =>
      (await control(`/_grant?scope=read${expiresIn ? `&expires_in=${expiresIn}` : ""}`)) as {
        access_token: string;
        refresh_token: string;
      },
  };
}

export interface BrokerOptions {
  backend: Backend;
  fake: FakeProvider;
  /** Extra TOML sections, e.g. {events: {heartbeat_seconds: 1}}. */
  sections?: Record<string, Record<string, unknown>>;
}

function toml(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(toml).join(", ")}]`;
  return typeof value === "string" ? JSON.stringify(value) : String(value);
}

/** A `broker serve` process with a TOML file of its own; restartable on the same port. */
export class BrokerProcess {
  readonly dir = mkdtempSync(join(tmpdir(), "node-client-"));
  readonly config = join(this.dir, "broker.toml");
  port = 0;
  databaseUrl = "";
  private child: ChildProcess | undefined;
  private dropDatabase: () => void = () => undefined;
  log: string[] = [];

  constructor(private readonly options: BrokerOptions) {}

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  async start(): Promise<this> {
    if (this.port === 0) {
      this.port = await freePort();
      const database = newDatabase(this.options.backend, this.dir);
      this.databaseUrl = database.url;
      this.dropDatabase = database.drop;
      this.writeConfig();
      execFileSync(BROKER, ["--config", this.config, "migrate"], { env: this.env(), stdio: "ignore" });
    }
    const child = spawn(BROKER, ["--config", this.config, "serve"], {
      env: this.env(),
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.child = child;
    await new Promise<void>((done, fail) => {
      const lines = createInterface({ input: child.stderr! });
      lines.on("line", (line) => {
        this.log.push(line);
        if (/broker serving on/.test(line)) done();
      });
      child.once("exit", (code) => fail(new Error(`broker exited (${code}):\n${this.log.join("\n")}`)));
    });
    return this;
  }

  /** SIGTERM (graceful shutdown); resolves with the exit code. */
  stop(): Promise<number | null> {
    const child = this.child;
    if (child === undefined || child.exitCode !== null) return Promise.resolve(child?.exitCode ?? null);
    return new Promise((done) => {
      child.once("exit", (code) => done(code));
      child.kill("SIGTERM");
    });
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.start();
  }

  async dispose(): Promise<void> {
    await this.stop();
    this.dropDatabase();
  }

  /** `broker audit --json` rows of this broker's database. */
  audit(...args: string[]): Array<Record<string, unknown>> {
    const out = execFileSync(BROKER, ["--config", this.config, "audit", "--json", ...args], {
      env: this.env(),
      encoding: "utf8",
    });
    return JSON.parse(out) as Array<Record<string, unknown>>;
  }

  private env(): NodeJS.ProcessEnv {
    const env: NodeJS.ProcessEnv = {};
    for (const [key, value] of Object.entries(process.env)) if (!key.startsWith("BROKER_")) env[key] = value;
    return env;
  }

  private writeConfig(): void {
    const { fake, sections = {} } = this.options;
    const key = execFileSync(BROKER, ["keygen"], { encoding: "utf8" }).trim();
    const base: Record<string, Record<string, unknown>> = {
      server: { listen: `127.0.0.1:${this.port}`, environment: "test", shutdown_grace_seconds: 1 },
      database: { url: this.databaseUrl },
      keys: { keys: key },
      refresh: { background: false, max_attempts: 1, failure_backoff_seconds: 0.5 },
      events: { poll_seconds: 0.2, heartbeat_seconds: 1 },
      "callers.admin": { token_sha256: sha256(ADMIN_TOKEN) },
      "callers.runner": {
        token_sha256: sha256(RUNNER_TOKEN),
        requires_grant: true,
        methods: ["GetAccessToken", "GetIntegration", "ListIntegrations", "Proxy"],
      },
      "callers.proxyonly": { token_sha256: sha256(PROXY_TOKEN), proxy_only: true },
      "providers.acme": {
        token_url: fake.token_url,
        authorization_url: fake.authorization_url,
        revocation_url: fake.revocation_url,
        client_id: fake.client_id,
        client_secret: fake.client_secret,
        redirect_uris: ["https://app.example.test/api/integrations/acme/callback"],
        scopes: ["read"],
        rotates_refresh_tokens: true,
        api_base_url: fake.api_url,
      },
      "providers.keyed": { kinds: ["api_key"] },
      "providers.paused": { token_url: fake.token_url, client_id: fake.client_id, client_secret: fake.client_secret },
    };
    for (const [name, values] of Object.entries(sections)) base[name] = { ...base[name], ...values };
    const text = Object.entries(base)
      .map(([name, values]) =>
        [`[${name}]`, ...Object.entries(values).map(([k, v]) => `${k} = ${toml(v)}`)].join("\n"),
      )
      .join("\n\n");
    writeFileSync(this.config, text + "\n", { mode: 0o600 });
  }
}

/** Polls `check` until it holds (or throws after `ms`). */
export async function eventually<T>(check: () => T | Promise<T>, ms = 15_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (error) {
      if (Date.now() > deadline) throw error;
    }
    if (Date.now() > deadline) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 50));
  }
}
