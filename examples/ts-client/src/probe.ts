// One EngineService call, printed as one JSON line: for scripts and tests that check what a
// caller sees (auth, workspaces, TLS) without parsing the example's human-readable output.
//
//   npx tsx src/probe.ts get-run RUN_ID   → {"ok": true, "run": {...}}
//   npx tsx src/probe.ts list-runs        → {"ok": true, "runs": [...]}
//   on an RPC failure → {"ok": false, "code": "NOT_FOUND", "reason": "ERR_RUN_NOT_FOUND", ...}
//
// Same environment as src/main.ts (MACHINA_TARGET, MACHINA_API_KEY, MACHINA_TLS, MACHINA_CA_FILE).
// Exit status: 0 when the call succeeded, 1 when it failed, 2 on bad usage.
import { toJson } from "@bufbuild/protobuf";

import { RunSchema } from "./gen/machina/engine/v1/run_pb.js";
import { connectEngine, rpcFailure, settingsFromEnv } from "./machina.js";

const USAGE = "usage: tsx src/probe.ts get-run RUN_ID | list-runs";

async function call(args: string[]): Promise<Record<string, unknown>> {
  const engine = connectEngine(settingsFromEnv());
  const options = { timeoutMs: 15_000 };
  const [command, ...rest] = args;
  if (command === "get-run" && rest.length === 1) {
    const { run } = await engine.getRun({ runId: rest[0] }, options);
    return { run: toJson(RunSchema, run!) };
  }
  if (command === "list-runs" && rest.length === 0) {
    const { runs } = await engine.listRuns({}, options);
    return { runs: runs.map((run) => toJson(RunSchema, run)) };
  }
  throw new UsageError();
}

class UsageError extends Error {}

try {
  const result = await call(process.argv.slice(2));
  process.stdout.write(`${JSON.stringify({ ok: true, ...result })}\n`);
} catch (error) {
  if (error instanceof UsageError) {
    process.stderr.write(`${USAGE}\n`);
    process.exit(2);
  }
  const failure = rpcFailure(error);
  process.stdout.write(
    `${JSON.stringify({
      ok: false,
      code: failure.code,
      reason: failure.info?.reason ?? "",
      domain: failure.info?.domain ?? "",
      metadata: failure.info?.metadata ?? {},
      message: failure.message,
    })}\n`,
  );
  process.exit(1);
}
