/**
 * The README's TypeScript example, as written, from a bare directory that installed the package
 * from the repository (npm install <repo>/clients/node), against a broker started as `make run`
 * starts it (`broker serve --dev --demo-provider`).
 */
import { strict as assert } from "node:assert";
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { test } from "node:test";
import { BROKER, NODE_CLIENT, ROOT, freePort } from "./support/broker";

function readmeBlocks(): { example: string; commands: string } {
  const readme = readFileSync(join(ROOT, "README.md"), "utf8");
  const example = /```ts\n([\s\S]*?)```/.exec(readme)![1]!;
  const after = readme.slice(readme.indexOf(example) + example.length);
  const commands = /```sh\n([\s\S]*?)```/.exec(after)![1]!;
  return { example, commands };
}

test("the README's TypeScript example runs from a bare directory against make run's broker", { timeout: 150_000 }, async () => {
  const { example, commands } = readmeBlocks();
  // What the README tells to install, with the same versions.
  const install = /npm install "\$REPO\/clients\/node" (.*)/.exec(commands)![1]!.trim().split(/\s+/);
  const compile = /npx tsc (.*) example\.mts/.exec(commands)![1]!.trim().split(/\s+/);

  const home = mkdtempSync(join(tmpdir(), "node-readme-"));
  const repo = join(home, "repo");
  const bare = join(home, "bare");
  for (const dir of [repo, bare]) execFileSync("mkdir", ["-p", dir]);
  const port = await freePort();
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("BROKER_")) env[k] = v;
  const dev = spawn(BROKER, ["serve", "--dev", "--demo-provider", String(await freePort())], {
    cwd: repo,
    env: { ...env, BROKER_LISTEN: `127.0.0.1:${port}` },
    stdio: ["ignore", "pipe", "ignore"],
  });
  try {
    await new Promise<void>((done, fail) => {
      createInterface({ input: dev.stdout! }).on("line", (line) => /grpcurl/.test(line) && done());
      dev.once("exit", (code) => fail(new Error(`dev broker exited (${code})`)));
    });
    execFileSync("npm", ["init", "-y"], { cwd: bare, stdio: "ignore" });
    execFileSync("npm", ["install", "--no-audit", "--no-fund", NODE_CLIENT, ...install], { cwd: bare, stdio: "ignore" });
    writeFileSync(join(bare, "example.mts"), example);
    execFileSync("npx", ["tsc", ...compile, "example.mts"], { cwd: bare, stdio: "inherit" });
    const token = readFileSync(join(repo, ".broker", "dev-caller-token"), "utf8").trim();
    const out = execFileSync("node", ["example.mjs"], {
      cwd: bare,
      env: { ...env, BROKER_TOKEN: token, BROKER_LISTEN: `127.0.0.1:${port}` },
      encoding: "utf8",
    });
    const lines = out.trim().split("\n");
    assert.match(lines[0]!, /^Bearer at-example valid until \d{4}-/);
    assert.match(lines[1]!, /^INTEGRATION_NOT_FOUND NOT_FOUND [0-9a-f-]{36}$/);
  } finally {
    dev.kill("SIGTERM");
  }
});
