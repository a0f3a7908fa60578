"""The agent loop in process: an Engine over LocalStorage in a temporary directory, no gRPC.

``Harness`` drives runs through the engine's own methods (``create_run``, ``wait_run``,
``resume_run``) with a scripted model and the test tools (tests/tools.py), so an engine test can
look at what the loop did without a server, a channel or a client in between::

    async def test_something(harness: Harness) -> None:
        record = await harness.run("double 21", turn("", ("double", {"x": 21})), turn("42"))
        assert record.state is RunState.PAUSED          # double is "ask" in the harness
        record = await harness.approve(record)
        assert record.state is RunState.DONE
        assert [d["role"] for d in await harness.transcript(record)] == [...]

The ``harness`` fixture is registered for everything under tests/engine/ (its conftest.py).

``FakeClock`` is the engine's clock (``Engine(clock=...)``): every timestamp the engine takes
(events, approval expiry times, run deadlines, handoff backoff, the recovery sweep's lease
check) reads it, and a test moves it with ``advance`` instead of sleeping. The engine's timers
themselves (``loop.call_later``) still count real seconds: a deadline that passed on the fake
clock fires when an engine next sweeps (``Harness.restart``), not by itself.

The public surface (gRPC, the client) keeps its own tests; use this for the loop's behaviour.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from engine_service import Decision, Engine, Principal, RunRecord, RunSpec, RunState, ScriptedTurn
from engine_service.core._run import DecisionAction
from engine_service.core._types import Event
from tests.conftest import build_engine, turn

__all__ = ["FakeClock", "Harness", "harness", "turn"]

PRINCIPAL = Principal("default", "harness")


class FakeClock:
    """A clock that moves only when told (seconds since the epoch, like ``time.time``)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    """One engine at a time over one storage root; ``restart`` replaces it like a new process."""

    def __init__(
        self,
        root: Path,
        *,
        config: dict[str, Any] | None = None,
        clock: FakeClock | None = None,
        model_factory: Callable[[str, str], Any] | None = None,
    ) -> None:
        self.root = root
        self.config = config if config is not None else {"tools": {"permissions": {"double": "ask"}}}
        self.clock = clock or FakeClock()
        self.model_factory = model_factory
        self.principal = PRINCIPAL
        self.engine = self._build()

    def _build(self) -> Engine:
        return build_engine(self.root, config=self.config, clock=self.clock, model_factory=self.model_factory)

    async def start(self) -> Harness:
        await self.engine.start()
        return self

    async def close(self) -> None:
        await self.engine.close(grace=0.5)

    async def restart(self) -> Engine:
        """Close this engine and start a new one over the same storage and clock; its startup
        sweep recovers orphaned runs and fires approval deadlines that passed meanwhile."""
        await self.close()
        self.engine = self._build()
        await self.start()
        return self.engine

    async def create(self, task: str, *script: dict[str, Any], **spec: Any) -> RunRecord:
        """Create a run with a scripted model (``script`` as ``tests.conftest.turn`` builds it)."""
        turns = [ScriptedTurn.from_json(t) for t in script] if script else None
        run_spec = RunSpec(task=task, model_provider="scripted", script=turns, **spec)
        record, _ = await self.engine.create_run(self.principal, run_spec)
        return record

    async def wait(self, record: RunRecord | str, timeout: float = 30) -> RunRecord:
        """The run once it is paused or ended (fails the test if it is not within ``timeout``)."""
        run_id = record if isinstance(record, str) else record.run_id
        result, timed_out = await self.engine.wait_run(self.principal, run_id, timeout)
        assert not timed_out, f"run {run_id} still {result.state.value} after {timeout} s"
        return result

    async def run(self, task: str, *script: dict[str, Any], **spec: Any) -> RunRecord:
        """Create a run and wait until it pauses or ends."""
        return await self.wait(await self.create(task, *script, **spec))

    async def resume(self, record: RunRecord, *decisions: Decision) -> RunRecord:
        """Record ``decisions`` and wait until the run pauses or ends again."""
        await self.engine.resume_run(self.principal, record.run_id, list(decisions))
        return await self.wait(record)

    async def approve(self, record: RunRecord, action: str = "approve") -> RunRecord:
        """Answer every pending interrupt with ``action`` ("approve" or "reject")."""
        assert record.state is RunState.PAUSED, record.state
        decisions = [Decision(i.interrupt_id, DecisionAction(action)) for i in record.interrupts]
        return await self.resume(record, *decisions)

    async def transcript(self, record: RunRecord) -> list[dict[str, Any]]:
        """The run's committed transcript entries (role, text, tool, is_error, ...)."""
        return await self.engine.storage.read_segments(
            self.principal.workspace_id, record.run_id, "transcript", 0, 10_000
        )

    async def events(self, record: RunRecord) -> list[dict[str, Any]]:
        """The run's committed events, one per seq: ``{"seq", "t" (clock time), "k" (kind), "d" (data)}``
        (a text delta's data is ``{"text", "turn"}``, also where several are stored as one record)."""
        docs = await self.engine.storage.read_segments(
            self.principal.workspace_id, record.run_id, "events", 0, 10_000
        )
        return [one for doc in docs for one in Event.from_json(doc).expand()]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """A started in-process engine with the test tools; ``double`` needs approval."""
    h = Harness(tmp_path / "storage")
    await h.start()
    yield h
    await h.close()
