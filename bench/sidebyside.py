"""``python -m bench.sidebyside SIDE TURNS REPEATS``: one side of the LangGraph comparison.

SIDE is ``machina`` (the engine in process: scripted model, no-op tool, local
storage) or ``langgraph`` (PyPI ``langgraph``: the prebuilt ReAct agent, a scripted
chat model that calls the same no-op tool, the SQLite checkpointer in a temp file).
Both run the same script: TURNS model turns, each but the last calling the no-op
tool, the last answering; both checkpoint every step and hand the model the full
history every turn. Each side runs in its own process (``__main__`` starts one per
side and size) so their peak RSS can be compared; the result is one JSON line on
stdout: per-turn milliseconds of each repeat (after one discarded warm-up run),
the process's RSS after the imports and at its peak, and the bytes one run stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import PRINCIPAL, bench_engine, dir_bytes, proc_status_mb, tool_script


def _plan(turns: int, repeats: int) -> list[int]:
    """Run lengths: a short warm-up run (imports, caches; not counted), then the measured repeats."""
    return [min(turns, 10)] + [turns] * repeats


def _rss() -> dict[str, float]:
    return {"rss_mb": proc_status_mb("self", "VmRSS"), "peak_rss_mb": proc_status_mb("self", "VmHWM")}


# -- machina ---------------------------------------------------------------------------


async def _machina(turns: int, repeats: int) -> dict[str, Any]:
    from engine_service import LocalStorage, RunSpec, RunState

    baseline = _rss()["rss_mb"]
    per_turn, stored = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        engine = bench_engine(LocalStorage(Path(tmp) / "storage"), str(Path(tmp) / "work"))
        for i, n in enumerate(_plan(turns, repeats)):
            spec = RunSpec(task="bench", model_provider="scripted", script=tool_script(n), max_turns=n + 1)
            started = time.perf_counter()
            record, _ = await engine.create_run(PRINCIPAL, spec)
            record, _ = await engine.wait_run(PRINCIPAL, record.run_id, timeout=600)
            elapsed = time.perf_counter() - started
            assert record.state is RunState.DONE, record.error
            assert record.meta.turns == n
            if i:
                per_turn.append(elapsed * 1000 / n)
            if i == 1:
                stored = dir_bytes(
                    Path(tmp, "storage", "workspaces", PRINCIPAL.workspace_id, "runs", record.run_id)
                )
        await engine.close()
    return {"per_turn_ms": per_turn, "baseline_rss_mb": baseline, "storage_bytes": stored}


# -- langgraph --------------------------------------------------------------------------


def _langgraph(turns: int, repeats: int) -> dict[str, Any]:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, BaseMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from langchain_core.tools import tool
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.prebuilt import create_react_agent

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
            if turn < self.turns:
                calls = [{"name": "noop", "args": {}, "id": f"call_{turn}_1"}]
                message = AIMessage(content="step", tool_calls=calls)
            else:
                message = AIMessage(content="done")
            return ChatResult(generations=[ChatGeneration(message=message)])

    @tool
    def noop() -> str:
        """Do nothing (benchmarks and loops)."""
        return "ok"

    baseline = _rss()["rss_mb"]
    per_turn, stored = [], 0
    for i, n in enumerate(_plan(turns, repeats)):
        with tempfile.TemporaryDirectory() as tmp:
            connection = sqlite3.connect(Path(tmp) / "checkpoints.sqlite", check_same_thread=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # create_react_agent moved to langchain.agents in v1
                agent = create_react_agent(
                    ScriptedChatModel(turns=n), [noop], checkpointer=SqliteSaver(connection)
                )
            config: Any = {"configurable": {"thread_id": f"bench-{i}"}, "recursion_limit": 2 * n + 10}
            started = time.perf_counter()
            state = agent.invoke({"messages": [("user", "bench")]}, config)
            elapsed = time.perf_counter() - started
            connection.close()
            assert state["messages"][-1].content == "done"
            assert sum(isinstance(m, AIMessage) for m in state["messages"]) == n
            if i:
                per_turn.append(elapsed * 1000 / n)
            if i == 1:
                stored = dir_bytes(Path(tmp))  # the database and any -wal/-journal file
    return {"per_turn_ms": per_turn, "baseline_rss_mb": baseline, "storage_bytes": stored}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("side", choices=["machina", "langgraph"])
    parser.add_argument("turns", type=int)
    parser.add_argument("repeats", type=int)
    ns = parser.parse_args(argv)
    if ns.side == "machina":
        result = asyncio.run(_machina(ns.turns, ns.repeats))
    else:
        result = _langgraph(ns.turns, ns.repeats)
    print(json.dumps({**result, **_rss()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
