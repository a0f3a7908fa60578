"""``python -m demo``: a real engine and a real runner process, one task end to end.

The engine runs without the ``subprocess`` capability (like a sandboxed host),
so the task's Bash step is handed to the runner, which continues the run over
the same storage; the client sees the whole run in one event stream from the
engine. Offline (no API key) the model is the scripted one; with
ANTHROPIC_API_KEY or OPENAI_API_KEY set, the same demo drives the real model.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from client_py import EngineClient, RunEvent
from engine_service.tools import Sandbox

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "demo" / "engine.toml"
TASK = (
    "Check today's weather in Paris, save a one-line forecast to forecast.txt with Bash, then email "
    "alice@example.com that forecast (subject 'Paris weather'). Tell me what you did."
)
SCRIPT: list[dict[str, Any]] = [
    {
        "text": "I'll look up the weather in Paris first.",
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
    },
    {
        "text": "Sunny and 21°C. I'll save the forecast with Bash.",
        "tool_calls": [
            {
                "name": "Bash",
                "arguments": {"command": "echo 'Paris: sunny, 21°C' > forecast.txt && cat forecast.txt"},
            }
        ],
    },
    {
        "text": "Saved. Now I'll email Alice the forecast.",
        "tool_calls": [
            {
                "name": "send_email",
                "arguments": {
                    "to": "alice@example.com",
                    "subject": "Paris weather",
                    "body": "Paris: sunny, 21°C",
                },
            }
        ],
    },
    {"text": "Done: I checked the Paris weather, saved it to forecast.txt and emailed Alice the forecast."},
]

BOLD, DIM, GREEN, YELLOW, CYAN, RESET = (
    ("\033[1m", "\033[2m", "\033[32m", "\033[33m", "\033[36m", "\033[0m")
    if sys.stdout.isatty()
    else ("",) * 6
)


def say(line: str = "") -> None:
    print(line, flush=True)


class Service:
    """A ``python -m`` service process that writes its port(s) to a file once serving."""

    def __init__(self, module: str, work: Path, args: list[str], env: dict[str, str]) -> None:
        self.port_file = work / f"{module}.port"
        self.log_path = work / f"{module}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--port-file", str(self.port_file), "--log-format", "json", *args],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env},
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not (self.port_file.exists() and self.port_file.read_text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{module} did not start; see {self.log_path}")
            time.sleep(0.02)
        self.ports = self.port_file.read_text()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()


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
        say(f"{YELLOW}⚙ {call.tool_name}{RESET} {json.dumps(call.arguments, ensure_ascii=False)}")
    elif kind == "tool_call_completed":
        mark = "✖" if event.is_error else "✔"  # type: ignore[attr-defined]
        say(f"  {mark} {event.output.strip()}")  # type: ignore[attr-defined]
    elif kind == "handoff_to_runner":
        say(f"{BOLD}⇢ handed off to the runner{RESET} (this engine cannot run {', '.join(event.tools)})")  # type: ignore[attr-defined]
    elif kind == "approval_requested":
        say(f"{BOLD}⏸ approval needed:{RESET} {event.interrupt.description}")  # type: ignore[attr-defined]
    elif kind == "approval_decided":
        say(f"{GREEN}✔ {event.decision}{RESET} by {event.decided_by}")  # type: ignore[attr-defined]
    elif kind == "resumed":
        say(f"{DIM}▸ resumed by {event.resumed_by}{RESET}")  # type: ignore[attr-defined]
    elif kind == "run_finished":
        say(f"{DIM}▸ run finished: {event.state}{RESET}")  # type: ignore[attr-defined]


def main() -> int:
    real_model = bool(os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    work = Path(tempfile.mkdtemp(prefix="machina-demo-"))
    shared = {
        "MACHINA_STORAGE": str(work / "storage"),
        "MACHINA_WORKDIR_ROOT": str(work / "workdirs"),
        "MACHINA_RUNNER_SECRET": secrets.token_urlsafe(24),
    }
    say(f"{BOLD}Machina demo{RESET} — engine + runner processes, storage {work}")
    # The runner runs Bash in a bubblewrap sandbox. Where bubblewrap cannot run (macOS, a container
    # without user namespaces), the demo says so and opts out explicitly; the runner logs a warning.
    unsandboxed = Sandbox().unavailable_reason()
    if unsandboxed is not None:
        say(
            f"{YELLOW}no sandbox here ({unsandboxed}): the runner runs Bash unsandboxed "
            f"(MACHINA_SANDBOX=none){RESET}"
        )
        shared["MACHINA_SANDBOX"] = "none"
    runner = Service("runner_service", work, ["--config", str(CONFIG), "--listen", "127.0.0.1:0",
                                              "--http-listen", "127.0.0.1:0"], shared)  # fmt: skip
    http_port = json.loads(runner.ports)["http"]
    engine = Service(
        "engine_service",
        work,
        ["--config", str(CONFIG), "--listen", "127.0.0.1:0", "--capabilities-subprocess", "false"],
        {**shared, "MACHINA_RUNNER_URL": f"http://127.0.0.1:{http_port}/continue"},
    )
    target = f"127.0.0.1:{engine.ports}"
    sandbox = "unsandboxed" if unsandboxed else "Bash in a bubblewrap sandbox"
    say(
        f"{DIM}engine on {target} (no subprocess capability), runner on http://127.0.0.1:{http_port} "
        f"({sandbox}){RESET}"
    )
    try:
        with EngineClient(target) as client:
            say(f"{BOLD}task:{RESET} {TASK}")
            options: dict[str, Any] = {} if real_model else {"model": "scripted", "script": SCRIPT}
            handle = client.create(TASK, **options)
            state: dict[str, bool] = {}
            for event in handle.events(follow=True):
                show(event, state)
                if event.kind == "approval_requested":
                    interrupt = event.interrupt  # type: ignore[attr-defined]
                    say(f"{GREEN}→ approving{RESET} {interrupt.tool_name} ({interrupt.interrupt_id})")
                    handle.approve(interrupt.interrupt_id)
            run = handle.wait(timeout=60)
            say()
            say(f"{BOLD}final state:{RESET} {run.state}")
            if run.state == "DONE":
                say(f"{BOLD}answer:{RESET} {run.data}")
            elif run.error is not None:
                say(f"{BOLD}error:{RESET} {run.error.code}: {run.error.message}")
            tokens = f"{run.meta.usage.input_tokens} in / {run.meta.usage.output_tokens} out"
            say(f"{DIM}turns {run.meta.turns}, tokens {tokens}{RESET}")
            return 0 if run.state == "DONE" else 1
    finally:
        codes = (engine.stop(), runner.stop())
        say(f"{DIM}engine and runner stopped gracefully (exit {codes[0]}, {codes[1]}){RESET}")


if __name__ == "__main__":
    raise SystemExit(main())
