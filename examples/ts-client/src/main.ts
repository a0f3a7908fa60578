// The Machina TypeScript example: create a run with the offline scripted model, stream its
// events, approve the tool call that needs approval, and wait for the result.
//
//   MACHINA_TARGET=127.0.0.1:50051 [MACHINA_API_KEY=...] npx tsx src/main.ts [--run-id ID] [--follow-up TASK]
//
// With --follow-up, a second run continues the first one's thread (the model sees the first
// conversation, then TASK), and the thread's runs are listed.
// Start an engine with the demo tools first: `just serve-engine --config demo/engine.toml`.
// Exit status: 0 when the run is DONE, 1 when it is not or a call fails, 2 on bad usage.
import { parseArgs } from "node:util";

import { toJson } from "@bufbuild/protobuf";
import { ValueSchema } from "@bufbuild/protobuf/wkt";

import type { RunEvent } from "./gen/machina/engine/v1/event_pb.js";
import { RunState, type Run } from "./gen/machina/engine/v1/run_pb.js";
import { connectEngine, describeFailure, rpcFailure, settingsFromEnv, type EngineClient } from "./machina.js";

const TASK = "Check the weather in Paris and email alice@example.com about it.";

// The scripted model replays these turns; `send_email` is an `ask` tool in demo/engine.toml.
const SCRIPT = [
  {
    text: "I'll check the weather in Paris first.",
    toolCalls: [{ name: "get_weather", arguments: { city: "Paris" } }],
  },
  {
    text: "Now I'll email Alice.",
    toolCalls: [
      {
        name: "send_email",
        arguments: { to: "alice@example.com", subject: "Paris weather", body: "The Paris forecast is in." },
      },
    ],
  },
  { text: "Done: I emailed Alice the Paris weather." },
];

const CALL_TIMEOUT_MS = 30_000;

function print(line = ""): void {
  process.stdout.write(`${line}\n`);
}

function stateName(state: RunState): string {
  return RunState[state]?.replace(/^RUN_STATE_/, "") ?? String(state);
}

async function main(): Promise<number> {
  let runId = "";
  let followUp = "";
  try {
    ({
      values: { "run-id": runId = "", "follow-up": followUp = "" },
    } = parseArgs({ options: { "run-id": { type: "string" }, "follow-up": { type: "string" } } }));
  } catch (error) {
    process.stderr.write(`usage: tsx src/main.ts [--run-id ID] [--follow-up TASK]\n${String(error)}\n`);
    return 2;
  }
  const settings = settingsFromEnv();
  const engine = connectEngine(settings);
  print(`engine ${settings.target}${settings.tls ? " (TLS)" : ""}`);

  // Request messages can be given as plain objects; unset fields take their defaults.
  const spec = {
    task: TASK,
    runId,
    model: { provider: "scripted", script: SCRIPT },
    labels: { example: "ts-client" },
  };
  const created = await engine.createRun({ spec }, { timeoutMs: CALL_TIMEOUT_MS });
  const run = created.run!;
  print(`created run ${run.runId} (${stateName(run.state)}) in workspace ${run.workspaceId}`);
  print(`task: ${run.task}`);

  await followEvents(engine, run.runId);

  // The server-side wait ends before the client's deadline, so a slow run reports `timed_out`.
  const waited = await engine.waitRun(
    { runId: run.runId, timeoutMs: BigInt(CALL_TIMEOUT_MS) },
    { timeoutMs: CALL_TIMEOUT_MS + 5_000 },
  );
  const status = report(waited.run!, waited.timedOut);
  if (status !== 0 || !followUp) return status;
  return await continueThread(engine, waited.run!, followUp);
}

/** Starts the next run of the run's thread: the model sees the conversation so far, then `task`. */
async function continueThread(engine: EngineClient, previous: Run, task: string): Promise<number> {
  const spec = {
    task,
    threadId: previous.threadId,
    model: { provider: "scripted", script: [{ text: `Following up on "${previous.task}": ${task}` }] },
    labels: { example: "ts-client" },
  };
  const created = await engine.createRun({ spec }, { timeoutMs: CALL_TIMEOUT_MS });
  print(`follow-up run ${created.run!.runId} on thread ${created.run!.threadId}`);
  const waited = await engine.waitRun(
    { runId: created.run!.runId, timeoutMs: BigInt(CALL_TIMEOUT_MS) },
    { timeoutMs: CALL_TIMEOUT_MS + 5_000 },
  );
  const status = report(waited.run!, waited.timedOut);
  const { thread } = await engine.getThread({ threadId: previous.threadId }, { timeoutMs: CALL_TIMEOUT_MS });
  print(`thread ${thread!.threadId}: ${thread!.runIds.join(" → ")}`);
  return status;
}

/** Streams every event until the run ends, approving each approval request as it arrives. */
async function followEvents(engine: EngineClient, runId: string): Promise<void> {
  const stream = engine.streamRunEvents({ runId, afterSeq: 0n, follow: true }, { timeoutMs: 60_000 });
  let inText = false;
  for await (const batch of stream) {
    for (const event of batch.events) {
      if (event.kind.case === "textDelta") {
        if (!inText) process.stdout.write("model: ");
        process.stdout.write(event.kind.value.text);
        inText = true;
        continue;
      }
      if (inText) print();
      inText = false;
      show(event);
      if (event.kind.case === "approvalRequested") {
        const interrupt = event.kind.value.interrupt!;
        print(`  → approving ${interrupt.toolName} (${interrupt.interruptId})`);
        // A Decision answers one interrupt; `action` is a oneof: approve, reject or respond.
        const approve = { case: "approve", value: {} } as const;
        await engine.resumeRun(
          { runId, decisions: [{ interruptId: interrupt.interruptId, action: approve }] },
          { timeoutMs: CALL_TIMEOUT_MS },
        );
      }
    }
  }
  if (inText) print();
}

function show(event: RunEvent): void {
  const seq = `#${event.seq}`.padEnd(4);
  const kind = event.kind;
  switch (kind.case) {
    case "runStarted":
      print(`${seq} run started on ${kind.value.model}`);
      break;
    case "toolCallStarted":
      print(`${seq} tool ${kind.value.call?.toolName} ${JSON.stringify(kind.value.call?.arguments ?? {})}`);
      break;
    case "toolCallCompleted": {
      const mark = kind.value.isError ? "✖" : "✔";
      print(`${seq} ${mark} ${kind.value.toolName}: ${kind.value.output.trim()}`);
      break;
    }
    case "approvalRequested":
      print(`${seq} approval needed: ${kind.value.interrupt?.description}`);
      break;
    case "approvalDecided":
      print(`${seq} ${kind.value.decision} by ${kind.value.decidedBy}`);
      break;
    case "paused":
      print(`${seq} paused`);
      break;
    case "resumed":
      print(`${seq} resumed by ${kind.value.resumedBy}`);
      break;
    case "handoffToRunner":
      print(`${seq} handed off to the runner (${kind.value.tools.join(", ")})`);
      break;
    case "runFinished":
      print(`${seq} run finished: ${stateName(kind.value.state)}`);
      break;
    default:
      // assistant_message, usage, api_call, ...: not needed for a readable transcript.
      break;
  }
}

function report(run: Run, timedOut: boolean): number {
  print(`final state: ${stateName(run.state)}${timedOut ? " (wait timed out)" : ""}`);
  if (run.state === RunState.DONE && run.data) {
    // `data` is a google.protobuf.Value: text, or JSON in structured-output mode.
    const data = toJson(ValueSchema, run.data);
    print(`answer: ${typeof data === "string" ? data : JSON.stringify(data)}`);
  }
  if (run.error) print(`error: ${run.error.code}: ${run.error.message}`);
  const usage = run.meta?.usage;
  const tokens = `${usage?.inputTokens ?? 0n} in / ${usage?.outputTokens ?? 0n} out`;
  print(`turns ${run.meta?.turns ?? 0}, tokens ${tokens}`);
  return run.state === RunState.DONE ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    process.stderr.write(`error: ${describeFailure(rpcFailure(error))}\n`);
    process.exit(1);
  },
);
