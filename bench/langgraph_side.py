"""``python -m bench.langgraph_side AGENT SYNC TURNS RUNS``: LangGraph's side of the per-turn comparison.

Imports only the standard library, LangChain/LangGraph and ``bench._script`` (never the engine
or grpc), so its RSS is LangGraph's own. AGENT is ``create_agent`` (``langchain.agents``, the
current API) or ``prebuilt`` (``langgraph.prebuilt.create_react_agent``, deprecated); SYNC is
``default`` (``SqliteSaver`` as it comes: WAL, SQLite's default ``synchronous``) or ``off``
(``PRAGMA synchronous=OFF``: no fsync, like the engine's default). The model is a chat model
that plays ``bench._script.edit_script`` (the turn is the number of AI messages in the history
it is handed); the tools write and edit a file in a temp directory as the engine's do.

One discarded warm-up run, then RUNS runs of TURNS turns, each after a 1-turn run (creating
and finishing a run, left out of per-turn growth). Prints one JSON line: per-run milliseconds,
the process's RSS after the imports, now and at its peak, the bytes the first measured run
stored, and whether the engine or grpc got imported (it must not).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._script import edit_script


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def measure(agent_kind: str, sync: str, turns: int, runs: int) -> dict[str, Any]:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, BaseMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from langchain_core.tools import tool
    from langgraph.checkpoint.sqlite import SqliteSaver

    class ScriptedChatModel(BaseChatModel):
        """Plays the script: the turn is the number of AI messages in the history it is handed."""

        turns: int

        @property
        def _llm_type(self) -> str:
            return "scripted"

        def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
            return self

        def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                      **kwargs: Any) -> ChatResult:  # fmt: skip
            turn = sum(1 for m in messages if isinstance(m, AIMessage)) + 1
            text, calls = edit_script(self.turns)[turn - 1]
            tool_calls = [{"name": n, "args": a, "id": f"call_{turn}_{i}"} for i, (n, a) in enumerate(calls)]
            return ChatResult(
                generations=[ChatGeneration(message=AIMessage(content=text, tool_calls=tool_calls))]
            )

    workdir = Path(tempfile.mkdtemp(prefix="bench-lg-work-"))

    def _replace(path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    @tool("Write")
    def write_tool(path: str, content: str) -> str:
        """Create or overwrite a text file."""
        _replace(workdir / path, content)
        return f"wrote {len(content)} bytes to {path}"

    @tool("Edit")
    def edit_tool(path: str, old_string: str, new_string: str) -> str:
        """Replace exact text in a file."""
        text = (workdir / path).read_text()
        if text.count(old_string) != 1:
            raise ValueError(f"old_string not found once in {path}")
        _replace(workdir / path, text.replace(old_string, new_string, 1))
        return f"replaced 1 occurrence(s) in {path}"

    def make(n: int, saver: Any) -> Any:
        if agent_kind == "create_agent":
            from langchain.agents import create_agent

            return create_agent(ScriptedChatModel(turns=n), [write_tool, edit_tool], checkpointer=saver)
        from langgraph.prebuilt import create_react_agent

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in favour of create_agent
            return create_react_agent(ScriptedChatModel(turns=n), [write_tool, edit_tool], checkpointer=saver)

    pragmas: dict[str, Any] = {}

    def one_run(n: int, tag: str) -> tuple[float, int]:
        with tempfile.TemporaryDirectory() as tmp:
            connection = sqlite3.connect(Path(tmp) / "checkpoints.sqlite", check_same_thread=False)
            if sync == "off":
                connection.execute("PRAGMA synchronous=OFF")
            saver = SqliteSaver(connection)
            agent = make(n, saver)
            config: Any = {"configurable": {"thread_id": tag}, "recursion_limit": 2 * n + 10}
            started = time.perf_counter()
            state = agent.invoke({"messages": [("user", "bench")]}, config)
            elapsed = time.perf_counter() - started
            pragmas["journal_mode"] = connection.execute("PRAGMA journal_mode").fetchone()[0]
            pragmas["synchronous"] = connection.execute("PRAGMA synchronous").fetchone()[0]
            connection.close()
            if state["messages"][-1].content != "done":
                raise RuntimeError(f"the run ended with {state['messages'][-1]!r}")
            if sum(isinstance(m, AIMessage) for m in state["messages"]) != n:
                raise RuntimeError("the run did not take the scripted number of turns")
            return elapsed * 1000, _dir_bytes(Path(tmp))

    baseline = _status_mb("VmRSS")
    one_run(min(turns, 10), "warm-up")
    per_run, one_turn, stored = [], [], 0
    for i in range(runs):
        one_turn.append(one_run(1, f"one-{i}")[0])
        elapsed, size = one_run(turns, f"run-{i}")
        per_run.append(elapsed)
        stored = stored or size
    return {
        "per_run_ms": per_run,
        "one_turn_ms": one_turn,
        "storage_bytes": stored,
        "baseline_rss_mb": baseline,
        "rss_mb": _status_mb("VmRSS"),
        "peak_rss_mb": _status_mb("VmHWM"),
        "pragmas": pragmas,
        "imports_engine_or_grpc": sorted(
            m for m in sys.modules if m.split(".")[0] in ("engine_service", "grpc", "machina")
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("agent", choices=["create_agent", "prebuilt"])
    parser.add_argument("sync", choices=["default", "off"])
    parser.add_argument("turns", type=int)
    parser.add_argument("runs", type=int)
    ns = parser.parse_args(argv)
    print(json.dumps(measure(ns.agent, ns.sync, ns.turns, ns.runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
