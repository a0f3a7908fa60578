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
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from client_py import EngineClient, ProgressLine, RunEvent
from engine_service.local import LocalService
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


def describe(event: RunEvent) -> str | None:
    """The line the demo prints for an event (None: shown only in the progress line)."""
    kind = event.kind
    if kind == "assistant_message" and event.text:  # type: ignore[attr-defined]
        return f"{CYAN}model:{RESET} {event.text}"  # type: ignore[attr-defined]
    if kind == "run_started":
        return f"{DIM}▸ run started on model {event.model}{RESET}"  # type: ignore[attr-defined]
    if kind == "tool_call_started":
        call = event.call  # type: ignore[attr-defined]
        return f"{YELLOW}⚙ {call.tool_name}{RESET} {json.dumps(call.arguments, ensure_ascii=False)}"
    if kind == "tool_call_completed":
        mark = "✖" if event.is_error else "✔"  # type: ignore[attr-defined]
        return f"  {mark} {event.output.strip()}"  # type: ignore[attr-defined]
    if kind == "handoff_to_runner":
        tools = ", ".join(event.tools)  # type: ignore[attr-defined]
        return f"{BOLD}⇢ handed off to the runner{RESET} (this engine cannot run {tools})"
    if kind == "approval_requested":
        return f"{BOLD}⏸ approval needed:{RESET} {event.interrupt.description}"  # type: ignore[attr-defined]
    if kind == "approval_decided":
        return f"{GREEN}✔ {event.decision}{RESET} by {event.decided_by}"  # type: ignore[attr-defined]
    if kind == "resumed":
        return f"{DIM}▸ resumed by {event.resumed_by}{RESET}"  # type: ignore[attr-defined]
    if kind == "run_finished":
        return f"{DIM}▸ run finished: {event.state}{RESET}"  # type: ignore[attr-defined]
    return None


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
    common = ["--config", str(CONFIG), "--listen", "127.0.0.1:0", "--log-format", "json"]
    runner = LocalService("runner_service", [*common, "--http-listen", "127.0.0.1:0"], env=shared, work=work)
    http_port = json.loads(runner.ports)["http"]
    engine = LocalService(
        "engine_service",
        [*common, "--capabilities-subprocess", "false"],
        env={**shared, "MACHINA_RUNNER_URL": f"http://127.0.0.1:{http_port}/continue"},
        work=work,
    )
    target = f"127.0.0.1:{engine.ports}"
    sandbox = "unsandboxed" if unsandboxed else "Bash in a bubblewrap sandbox"
    say(
        f"{DIM}engine on {target} (no subprocess capability), runner on http://127.0.0.1:{http_port} "
        f"({sandbox}){RESET}"
    )
    ok = False
    try:
        with EngineClient(target) as client:
            say(f"{BOLD}task:{RESET} {TASK}")
            options: dict[str, Any] = {} if real_model else {"model": "scripted", "script": SCRIPT}
            handle = client.create(TASK, **options)
            progress = ProgressLine()
            for event in handle.events(follow=True):
                line = describe(event)
                if line is not None:
                    progress.print(line)
                progress.update(event)
                if event.kind == "approval_requested":
                    interrupt = event.interrupt  # type: ignore[attr-defined]
                    progress.print(
                        f"{GREEN}→ approving{RESET} {interrupt.tool_name} ({interrupt.interrupt_id})"
                    )
                    handle.approve(interrupt.interrupt_id)
            progress.close()
            run = handle.wait(timeout=60)
            say()
            say(f"{BOLD}final state:{RESET} {run.state}")
            if run.state == "DONE":
                say(f"{BOLD}answer:{RESET} {run.data}")
            elif run.error is not None:
                say(f"{BOLD}error:{RESET} {run.error.code}: {run.error.message}")
            estimate = (
                " (estimated by the scripted model: about 4 characters a token)" if not real_model else ""
            )
            tokens = f"{run.meta.usage.input_tokens} in / {run.meta.usage.output_tokens} out{estimate}"
            say(f"{DIM}turns {run.meta.turns}, tokens {tokens}{RESET}")
            ok = run.state == "DONE"
            return 0 if ok else 1
    finally:
        codes = (engine.stop(), runner.stop())
        say(f"{DIM}engine and runner stopped gracefully (exit {codes[0]}, {codes[1]}){RESET}")
        if ok and codes == (0, 0):
            shutil.rmtree(work, ignore_errors=True)
            say(f"{DIM}removed {work}{RESET}")
        else:
            say(f"kept {work} for a look: the engine's and the runner's logs are there")


if __name__ == "__main__":
    raise SystemExit(main())
