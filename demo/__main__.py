"""``python -m demo``: start a real engine process and run a task end to end.

Offline (no API key) the model is the scripted one; with ANTHROPIC_API_KEY or
OPENAI_API_KEY set, the same demo drives the real model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from client_py import EngineClient, RunEvent

ROOT = Path(__file__).resolve().parent.parent
TASK = (
    "Check today's weather in Paris, then email alice@example.com a one-line forecast "
    "(subject 'Paris weather'). Tell me what you did."
)
SCRIPT: list[dict[str, Any]] = [
    {
        "text": "I'll look up the weather in Paris first.",
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
    },
    {
        "text": "Got it. Now I'll email Alice the forecast.",
        "tool_calls": [
            {
                "name": "send_email",
                "arguments": {
                    "to": "alice@example.com",
                    "subject": "Paris weather",
                    "body": "Paris today: sunny, 21°C.",
                },
            }
        ],
    },
    {"text": "Done: I checked the Paris weather and emailed Alice a one-line forecast."},
]

BOLD, DIM, GREEN, YELLOW, CYAN, RESET = (
    ("\033[1m", "\033[2m", "\033[32m", "\033[33m", "\033[36m", "\033[0m")
    if sys.stdout.isatty()
    else ("",) * 6
)


def say(line: str = "") -> None:
    print(line, flush=True)


def start_engine(storage: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = storage / "engine.port"
    cmd = [
        sys.executable,
        "-m",
        "engine_service",
        "--listen",
        "127.0.0.1:0",
        "--storage",
        str(storage),
        "--config",
        str(ROOT / "demo" / "engine.toml"),
        "--port-file",
        str(port_file),
        "--log-format",
        "json",
    ]
    log = open(storage / "engine.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the engine did not start; see {storage / 'engine.log'}")
        time.sleep(0.02)
    return proc, f"127.0.0.1:{port_file.read_text()}"


def show(event: RunEvent, state: dict[str, bool]) -> None:
    kind = event.kind
    if kind == "text_delta":
        if not state.get("in_text"):
            print(f"{CYAN}model:{RESET} ", end="")
            state["in_text"] = True
        print(event.text, end="", flush=True)  # type: ignore[attr-defined]
        return
    if state.get("in_text"):
        say()
        state["in_text"] = False
    if kind == "run_started":
        say(f"{DIM}▸ run started on model {event.model}{RESET}")  # type: ignore[attr-defined]
    elif kind == "tool_call_started":
        call = event.call  # type: ignore[attr-defined]
        say(f"{YELLOW}⚙ {call.tool_name}{RESET} {json.dumps(call.arguments)}")
    elif kind == "tool_call_completed":
        mark = "✖" if event.is_error else "✔"  # type: ignore[attr-defined]
        say(f"  {mark} {event.output}")  # type: ignore[attr-defined]
    elif kind == "approval_requested":
        interrupt = event.interrupt  # type: ignore[attr-defined]
        say(f"{BOLD}⏸ approval needed:{RESET} {interrupt.description}")
    elif kind == "approval_decided":
        say(f"{GREEN}✔ {event.decision}{RESET} by {event.decided_by}")  # type: ignore[attr-defined]
    elif kind == "resumed":
        say(f"{DIM}▸ resumed{RESET}")
    elif kind == "run_finished":
        say(f"{DIM}▸ run finished: {event.state}{RESET}")  # type: ignore[attr-defined]


def main() -> int:
    real_model = bool(os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    storage = Path(tempfile.mkdtemp(prefix="machina-demo-"))
    say(f"{BOLD}Machina demo{RESET} — engine process, storage {storage}")
    proc, target = start_engine(storage)
    say(f"{DIM}engine serving on {target} (pid {proc.pid}){RESET}")
    try:
        with EngineClient(target) as client:
            say(f"{BOLD}task:{RESET} {TASK}")
            options: dict[str, Any] = {} if real_model else {"model": "scripted", "script": SCRIPT}
            state: dict[str, bool] = {}
            execution = client.execute(TASK, **options)
            for event in execution:
                show(event, state)
            run = execution.run
            assert run is not None
            while run.state == "PAUSED":
                handle = client.attach(run.run_id)
                for interrupt in run.interrupts:
                    say(f"{GREEN}→ approving{RESET} {interrupt.tool_name} ({interrupt.interrupt_id})")
                    handle.approve(interrupt.interrupt_id)
                for event in handle.events(after_seq=run.last_seq, follow=True):
                    show(event, state)
                    if event.kind in ("paused", "run_finished"):
                        break
                run = handle.wait(timeout=60)
            say()
            say(f"{BOLD}final state:{RESET} {run.state}")
            if run.state == "DONE":
                say(f"{BOLD}answer:{RESET} {run.data}")
            elif run.error is not None:
                say(f"{BOLD}error:{RESET} {run.error.code}: {run.error.message}")
            usage = run.meta.usage
            tokens = f"{usage.input_tokens} in / {usage.output_tokens} out"
            say(f"{DIM}turns {run.meta.turns}, tokens {tokens}{RESET}")
            return 0 if run.state == "DONE" else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
            say(f"{DIM}engine stopped gracefully (exit {code}){RESET}")
        except subprocess.TimeoutExpired:
            proc.kill()
            say("engine did not stop in time; killed")


if __name__ == "__main__":
    raise SystemExit(main())
