"""The control plane on PostgreSQL (asyncpg): a pool for queries, one connection that LISTENs.

A commit never waits for the database: its state document joins a queue of index rows
(one per run, the newest replacing the older) that one task writes in batches, in order with
the queue, slot and timer changes. Losing the database never stops a run: commits go on in
storage and the rows wait until it answers. Meanwhile health reports NOT_SERVING, ListRuns
answers ERR_CONTROL_UNAVAILABLE, no new runs are claimed, and watchers of runs moved
elsewhere fall back to re-reading storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from importlib import resources
from typing import Any

import asyncpg

from engine_service.core._control import ChangeListener, Reload
from engine_service.core._control import control_unavailable as unavailable
from engine_service.core._types import JsonObject

log = logging.getLogger("machina.control")

RUNS_CHANNEL = "machina_runs"  # payload "seq state workspace run_id"
WORK_CHANNEL = "machina_work"  # a run was queued or a slot freed
TIMERS_CHANNEL = "machina_timers"  # a timer was set
# pg_advisory_lock key held while migrating ("machina" in ASCII, as a bigint).
MIGRATION_LOCK = 0x6D61636869_6E61
# How long a replica waits for another session's migration before its connection attempt fails.
MIGRATION_LOCK_WAIT_S = 30.0
RECONNECT_S = 1.0
# A watcher of a run moved elsewhere re-reads storage this often even without news.
WATCH_TIMEOUT_S = 300.0
# A slot whose run was claimed (or paused) this long ago and has not started (or resumed) since
# is its dead replica's: the sweep frees it.
STALE_CLAIM_S = 60.0
# A claimed timer that was not marked fired within this long is due again (its claimer died).
TIMER_CLAIM_S = 60.0
# Index rows written per statement batch.
INDEX_BATCH = 500
# Index rows kept in memory while the database is away; past that, the oldest keep only their
# run's key and are read again from storage when written.
MAX_QUEUED_DOCS = 10_000
# How long ListRuns waits for this replica's queued index rows (its own writes) to land.
CATCH_UP_S = 2.0
# How long a pause waits to write its deadline's timer row before queueing it instead.
SET_NOW_TIMEOUT_S = 1.0

# What "the database is not there" looks like, as opposed to a mistake in a query.
DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
)


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, SQL) of the schema migrations shipped in the package, in order."""
    found = []
    for entry in resources.files("engine_service.control").joinpath("migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name[:-4], entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(conn: Any, lock_wait_s: float = MIGRATION_LOCK_WAIT_S) -> list[str]:
    """Apply the migrations this database lacks, under an advisory lock (replicas starting
    together apply each once). Returns the names applied.

    A schema already current takes no lock (every connection and reconnection comes here: a
    session holding the lock, hung or partitioned away, must not keep replicas out). The lock is
    awaited at most ``lock_wait_s``; then the caller's connection attempt fails and is retried."""
    if await conn.fetchval("SELECT to_regclass('machina_schema') IS NOT NULL"):
        done = {row[0] for row in await conn.fetch("SELECT version FROM machina_schema")}
        if done.issuperset(version for version, _, _ in migrations()):
            return []
    deadline = time.monotonic() + lock_wait_s
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK):
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"another session has held the schema migration lock (pg_advisory_lock {MIGRATION_LOCK}) "
                f"for {lock_wait_s:g} s"
            )
        await asyncio.sleep(0.1)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS machina_schema (version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in await conn.fetch("SELECT version FROM machina_schema")}
        applied = []
        for version, name, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO machina_schema (version, name) VALUES ($1, $2)", version, name
                )
            applied.append(name)
            log.info("control plane: applied schema migration %s", name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


# One run's index row from its state document (the arguments of `index_row`); a row is never
# replaced by an older state. Shared by the engines and `reindex`.
UPSERT_RUN = """
INSERT INTO machina_runs AS r
    (workspace, run_id, state, pause_reason, labels, created_at, updated_at, last_seq, doc)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9::jsonb)
ON CONFLICT (workspace, run_id) DO UPDATE SET
    state = EXCLUDED.state, pause_reason = EXCLUDED.pause_reason, labels = EXCLUDED.labels,
    updated_at = EXCLUDED.updated_at, last_seq = EXCLUDED.last_seq, doc = EXCLUDED.doc
WHERE (r.last_seq, r.updated_at) <= (EXCLUDED.last_seq, EXCLUDED.updated_at)
"""

# The same, telling every replica (payload ``$10``) when the row changed.
_UPSERT_AND_NOTIFY = (
    "WITH up AS (" + UPSERT_RUN + " RETURNING 1) SELECT pg_notify('machina_runs', $10) FROM up"  # noqa: S608 (constants)
)


def _payload(doc: JsonObject) -> str:
    return f"{int(doc.get('last_seq') or 0)} {doc['state']} {doc['workspace_id']} {doc['run_id']}"


def index_row(doc: JsonObject) -> tuple[Any, ...]:
    """The index columns of a state document (the arguments of the upsert, less the payload)."""
    return (
        doc["workspace_id"],
        doc["run_id"],
        doc["state"],
        doc.get("pause_reason"),
        _jsonb(doc.get("labels") or {}),
        float(doc["created_at"]),
        float(doc["updated_at"]),
        int(doc.get("last_seq") or 0),
        _jsonb(doc),
    )


def _jsonb(value: Any) -> str:
    """``value`` as JSON PostgreSQL stores as jsonb, which refuses the NUL character: a task, an
    answer or an error text may hold one (the model's or the tenant's), and a row refused would
    leave the run unlisted and unrecovered. In the index (not in storage) NUL shows as U+FFFD."""
    text = json.dumps(value)
    if "\\u0000" in text:  # rare: rebuild with every NUL replaced, wherever it is
        text = json.dumps(_without_nul(value))
    return text


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


class PostgresControl:
    """A :class:`~engine_service.core._control.ControlPlane` on PostgreSQL."""

    indexed = True
    queued = True

    def __init__(
        self,
        url: str,
        *,
        max_running: int = 0,
        pool_size: int = 10,
        clock: Callable[[], float] = time.time,
        connect_timeout: float = 5.0,
    ) -> None:
        self._url = url
        self._max_running = max_running
        self._pool_size = pool_size
        self._clock = clock
        self._connect_timeout = connect_timeout
        self._owner = ""
        # Replicas with runs queued for them alone whose sessions the last sweep found gone.
        self._departed: set[str] = set()
        self._on_change: ChangeListener = lambda *_: None
        self._reload: Reload | None = None
        self._pool: Any = None
        self._listener: Any = None
        self._problem = "not connected yet"
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # Index rows to write, one per run (the newest state replaces an older one), oldest first.
        self._pending: dict[tuple[str, str], JsonObject] = {}
        # Runs whose rows did not fit in memory: their state is read from storage when written.
        self._overflow: dict[tuple[str, str], None] = {}
        # Commits queued / written so far (ListRuns waits for the ones queued before it).
        self._queued_count = 0
        self._written_count = 0
        self._caught_up = asyncio.Condition()
        # Queue, slot and timer changes, applied in order by the same task (retried while away).
        self._ops: deque[tuple[str, tuple[Any, ...]]] = deque()
        self._ops_wanted = asyncio.Event()
        # Events shown here, told to the other replicas by one task (coalesced per run).
        self._shown: dict[tuple[str, str], int] = {}
        self._shown_wanted = asyncio.Event()
        self._work = asyncio.Event()
        self._timers = asyncio.Event()

    # -- connection ---------------------------------------------------------------------

    def available(self) -> str:
        return "" if self._connected.is_set() else self._problem

    async def start(self, owner: str, on_change: ChangeListener, reload: Reload | None = None) -> None:
        """Connect (and migrate) in the background; returns at once. Waits up to the connect
        timeout for the first connection so that a healthy start is serving at once.
        ``reload`` reads a run's state document from storage (for index rows that did not fit
        in memory while the database was away)."""
        self._owner, self._on_change, self._reload = owner, on_change, reload
        for job in (self._connection_loop(), self._write_loop(), self._tell_shown()):
            task = asyncio.ensure_future(job)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._connect_timeout):
                await self._connected.wait()

    async def wait_connected(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        return self._connected.is_set()

    async def _connection_loop(self) -> None:
        while not self._closing:
            try:
                await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if problem != self._problem or self._connected.is_set():
                    log.warning("control plane unreachable (%s); retrying every %.0f s", problem, RECONNECT_S)
                self._problem = problem
                self._connected.clear()
                await self._disconnect()
                await asyncio.sleep(RECONNECT_S)

    async def _connect(self) -> None:
        timeout = self._connect_timeout
        # Its session names this replica: while it is open the replica is alive (see `_unpin_departed`).
        listener = await asyncpg.connect(
            self._url, timeout=timeout, server_settings={"application_name": self._owner[:63]}
        )
        self._listener = listener
        await migrate(listener)
        self._lost.clear()
        listener.add_termination_listener(lambda _conn: self._lost.set())
        await listener.add_listener(RUNS_CHANNEL, self._heard_run)
        await listener.add_listener(WORK_CHANNEL, lambda *_: self._work.set())
        await listener.add_listener(TIMERS_CHANNEL, lambda *_: self._timers.set())
        self._pool = await asyncpg.create_pool(
            self._url, min_size=1, max_size=self._pool_size, timeout=timeout, command_timeout=30
        )
        if not self._connected.is_set():
            log.info("control plane connected")
        self._connected.set()
        self._problem = ""
        # Whatever changed while nobody listened: every watcher here looks again.
        self._on_change("", "", 0, "")
        self._work.set()
        self._timers.set()
        self._ops_wanted.set()
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECONNECT_S):
                    await self._lost.wait()
            if self._lost.is_set():
                raise ConnectionError("the connection to PostgreSQL was lost")
            async with asyncio.timeout(timeout):
                await listener.fetchval("SELECT 1")

    async def _disconnect(self) -> None:
        pool, listener = self._pool, self._listener
        self._pool = self._listener = None
        if pool is not None:
            pool.terminate()
        if listener is not None:
            listener.terminate()

    async def close(self) -> None:
        self._closing = True
        # Last index rows and queue changes: a chance to land them (while the database answers).
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                while self._unwritten() and self._connected.is_set():
                    self._ops_wanted.set()
                    await asyncio.sleep(0.02)
        if self._unwritten():
            rows = len(self._pending) + len(self._overflow)
            log.warning(
                "control plane: %d index rows and %d changes not written at shutdown; the recovery "
                "sweep and `reindex` repair the index", rows, len(self._ops),
            )  # fmt: skip
        await self._unpin()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pool is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._pool.close()
        self._pool = None
        if self._listener is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._listener.close()
        self._listener = None

    async def _unpin_departed(self, pool: Any) -> None:
        """Runs queued for a replica alone (it held their per-run credentials) go to any replica
        once that replica is gone: its session (named by its owner id) is missing at two sweeps
        in a row, so a replica reconnecting at the moment of one sweep keeps its runs."""
        rows = await pool.fetch(
            "SELECT DISTINCT q.pinned_to FROM machina_queue q WHERE q.pinned_to IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a "
            "WHERE a.application_name = left(q.pinned_to, 63))"
        )
        missing = {str(row[0]) for row in rows}
        departed, self._departed = sorted(missing & self._departed), missing
        if departed and (moved := await _release_pinned(pool, departed)):
            log.warning(
                "control plane: %d queued runs of %d replicas that are gone may go to any replica now",
                moved, len(departed),
            )  # fmt: skip

    async def _unpin(self) -> None:
        """Runs queued for this replica alone (it held their per-run credentials) go to any
        replica once it stops, as they would be recovered without a control plane; otherwise
        nobody could ever claim them."""
        pool = self._pool
        if pool is None or not self._connected.is_set():
            return
        try:
            async with asyncio.timeout(2):
                if moved := await _release_pinned(pool, [self._owner]):
                    log.info("control plane: %d queued runs of this replica may go to any replica now", moved)
        except Exception:
            log.warning("control plane: releasing this replica's queued runs failed", exc_info=True)

    async def _run(self, what: Callable[[Any], Awaitable[Any]]) -> Any:
        """``what(pool)``, or ERR_CONTROL_UNAVAILABLE while the database is away."""
        pool = self._pool
        # Callers are tenants: they learn the kind of failure, never the database's host, user
        # or server message (those are in the operator's log).
        if pool is None or not self._connected.is_set():
            raise unavailable(self._problem.split(":", 1)[0] or "not connected yet")
        try:
            return await what(pool)
        except DOWN as exc:
            self._lost.set()
            log.warning("control plane query failed: %s: %s", type(exc).__name__, exc)
            raise unavailable(type(exc).__name__) from None

    def watch_timeout(self, polling: float) -> float:
        return WATCH_TIMEOUT_S if self._connected.is_set() else polling

    # -- the run index and live fan-out ------------------------------------------------

    def _heard_run(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        seq, state, ws, run_id = payload.split(" ", 3)
        self._on_change(ws, run_id, int(seq), state)

    async def committed(self, state: JsonObject) -> None:
        """Queue the run's index row; returns at once (written by `_write_loop`)."""
        key = (state["workspace_id"], state["run_id"])
        self._pending.pop(key, None)  # to the back of the line, with its newest state
        self._overflow.pop(key, None)
        self._pending[key] = state
        if len(self._pending) > MAX_QUEUED_DOCS and self._reload is not None:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            self._overflow[oldest] = None
        self._queued_count += 1
        self._ops_wanted.set()

    def _unwritten(self) -> bool:
        return bool(self._pending or self._overflow or self._ops)

    async def _catch_up(self) -> None:
        """Until the index rows this replica queued so far are written (or CATCH_UP_S passed):
        a caller lists what it created or finished through this replica."""
        target = self._queued_count
        if self._written_count >= target or not self._connected.is_set():
            return
        self._ops_wanted.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CATCH_UP_S), self._caught_up:
                await self._caught_up.wait_for(lambda: self._written_count >= target)

    async def _write_rows(self, pool: Any) -> None:
        """Write queued index rows, a batch per transaction, until none is left."""
        while self._pending or self._overflow:
            upto = self._queued_count
            batch: list[tuple[tuple[str, str], JsonObject]] = []
            while self._pending and len(batch) < INDEX_BATCH:
                key = next(iter(self._pending))
                batch.append((key, self._pending.pop(key)))
            unreadable = None
            while self._overflow and len(batch) < INDEX_BATCH and self._reload is not None:
                key = next(iter(self._overflow))
                try:
                    doc = await self._reload(*key)
                except Exception as exc:
                    unreadable = exc  # storage is away too: tried again shortly
                    break
                del self._overflow[key]
                if doc is not None and key not in self._pending:
                    batch.append((key, doc))
            try:
                await self._write_batch(pool, [doc for _key, doc in batch])
            except BaseException:
                for key, doc in batch:  # unless a newer state was queued meanwhile
                    if key not in self._pending and key not in self._overflow:
                        self._pending[key] = doc
                raise
            if unreadable is not None:
                raise RuntimeError(f"could not read a run's state to index it: {unreadable}")
            if not self._pending and not self._overflow:
                async with self._caught_up:
                    self._written_count = max(self._written_count, upto)
                    self._caught_up.notify_all()

    async def _write_batch(self, pool: Any, docs: list[JsonObject]) -> None:
        if not docs:
            return
        rows = [(*index_row(doc), _payload(doc)) for doc in docs]
        try:
            async with pool.acquire() as conn, conn.transaction():
                await conn.executemany(_UPSERT_AND_NOTIFY, rows)
        except DOWN:
            raise
        except Exception:
            # A row the database refuses must not hold back the others: one at a time, and the
            # one that fails again is left to the next commit of its run (or `reindex`).
            for row in rows:
                try:
                    await pool.execute(_UPSERT_AND_NOTIFY, *row)
                except DOWN:
                    raise
                except Exception:
                    log.exception("control plane: indexing run %s failed; skipped", row[1])

    def shown(self, workspace: str, run_id: str, seq: int) -> None:
        key = (workspace, run_id)
        if seq > self._shown.get(key, 0):
            self._shown[key] = seq
            self._shown_wanted.set()

    async def _tell_shown(self) -> None:
        while True:
            await self._shown_wanted.wait()
            self._shown_wanted.clear()
            batch, self._shown = self._shown, {}
            pool = self._pool
            if pool is None or not batch:
                continue  # nobody hears now; watchers re-read storage meanwhile
            payloads = [f"{seq} RUNNING {ws} {run_id}" for (ws, run_id), seq in batch.items()]
            try:
                await pool.execute(
                    "SELECT pg_notify('machina_runs', p) FROM unnest($1::text[]) AS p", payloads
                )
            except DOWN:
                self._lost.set()
            except Exception:
                log.warning("control plane: telling replicas of new events failed", exc_info=True)

    async def list_runs(
        self,
        workspace: str,
        *,
        states: Collection[str],
        labels: Mapping[str, str],
        after: tuple[float, str] | None,
        limit: int,
    ) -> list[JsonObject]:
        where = ["workspace = $1"]
        args: list[Any] = [workspace]
        if states:
            args.append(list(states))
            where.append(f"state = ANY(${len(args)}::text[])")
        if labels:
            args.append(json.dumps(dict(labels)))
            where.append(f"labels @> ${len(args)}::jsonb")
        if after is not None:
            args.extend(after)
            where.append(f"(created_at, run_id) < (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        sql = (
            f"SELECT doc FROM machina_runs WHERE {' AND '.join(where)} "  # noqa: S608 (placeholders only)
            f"ORDER BY created_at DESC, run_id DESC LIMIT ${len(args)}"
        )
        await self._catch_up()
        rows = await self._run(lambda pool: pool.fetch(sql, *args))
        return [json.loads(row[0]) for row in rows]

    async def active_runs(self, workspace: str | None) -> list[tuple[str, str]]:
        if workspace is None:  # the replica's own sweep (a tenant's sweep moves nothing of others)
            try:
                await self._run(self._unpin_departed)
            except Exception:
                log.warning(
                    "control plane: looking for queued runs of departed replicas failed", exc_info=True
                )

        async def query(pool: Any) -> list[Any]:
            async with pool.acquire() as conn:
                # Slots of runs that ended or paused without being released, or were claimed
                # and never started (their replica died): the runs are recovered or re-queued.
                await conn.execute(
                    "DELETE FROM machina_slots s USING machina_runs r "
                    "WHERE r.workspace = s.workspace AND r.run_id = s.run_id "
                    "AND (r.state IN ('DONE', 'FAILED', 'CANCELLED') "
                    "OR (r.state IN ('PAUSED', 'QUEUED') AND s.taken_at < $1)) "
                    "AND ($2::text IS NULL OR s.workspace = $2)",  # a tenant's sweep: its own only
                    self._clock() - STALE_CLAIM_S,
                    workspace,
                )
                return list(
                    await conn.fetch(
                        "SELECT r.workspace, r.run_id FROM machina_runs r "
                        "WHERE (r.state IN ('QUEUED', 'RUNNING') OR r.pause_reason = 'HANDOFF_TO_RUNNER') "
                        "AND ($1::text IS NULL OR r.workspace = $1) "
                        # Queued runs wait their turn; claimed ones are being started.
                        "AND NOT (r.state = 'QUEUED' AND (EXISTS (SELECT 1 FROM machina_queue q "
                        "WHERE q.workspace = r.workspace AND q.run_id = r.run_id) "
                        "OR EXISTS (SELECT 1 FROM machina_slots s "
                        "WHERE s.workspace = r.workspace AND s.run_id = r.run_id)))",
                        workspace,
                    )
                )

        return [(row[0], row[1]) for row in await self._run(query)]

    async def index_now(self, state: JsonObject) -> None:
        await self._run(lambda pool: pool.execute(_UPSERT_AND_NOTIFY, *index_row(state), _payload(state)))

    def forget_unstored(self, workspace: str, run_id: str, created_before: float) -> None:
        self._post("forget_unstored", workspace, run_id, created_before)

    async def ended_before(self, workspace: str, cutoff: float) -> list[str]:
        await self._catch_up()
        rows = await self._run(
            lambda pool: pool.fetch(
                "SELECT run_id FROM machina_runs WHERE workspace = $1 "
                "AND state IN ('DONE', 'FAILED', 'CANCELLED') AND updated_at < $2",
                workspace,
                cutoff,
            )
        )
        return [str(row[0]) for row in rows]

    async def delete_run(self, workspace: str, run_id: str) -> None:
        # In order with the run's other changes, and applied once the database answers if it
        # does not now (the run is gone from storage already).
        self._pending.pop((workspace, run_id), None)
        self._overflow.pop((workspace, run_id), None)
        self._post("delete_run", workspace, run_id)

    # -- the work queue ----------------------------------------------------------------

    async def enqueue(self, workspace: str, run_id: str, *, pinned: bool) -> int:
        async def put(pool: Any) -> int:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO machina_workspaces (workspace) VALUES ($1) ON CONFLICT DO NOTHING", workspace
                )
                await conn.execute(
                    "INSERT INTO machina_queue (workspace, run_id, pinned_to) VALUES ($1, $2, $3) "
                    "ON CONFLICT DO NOTHING",
                    workspace,
                    run_id,
                    self._owner if pinned else None,
                )
                await conn.execute("SELECT pg_notify('machina_work', '')")
                return int(await conn.fetchval(_POSITION, workspace, run_id) or 0)

        return int(await self._run(put))

    async def claim(self) -> tuple[str, str] | None:
        if self._pool is None or not self._connected.is_set():
            return None
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                return await self._claim(conn)
        except DOWN:
            self._lost.set()
            return None

    async def _claim(self, conn: Any) -> tuple[str, str] | None:
        limit, owner = self._max_running, self._owner
        # The workspace row is locked for the rest of the transaction: claims in one workspace
        # happen one at a time across replicas, so its limit holds; another workspace's go on.
        workspace = await conn.fetchval(
            """
            SELECT w.workspace FROM machina_workspaces w
            WHERE EXISTS (SELECT 1 FROM machina_queue q
                          WHERE q.workspace = w.workspace AND (q.pinned_to IS NULL OR q.pinned_to = $2))
              AND ($1 = 0 OR (SELECT count(*) FROM machina_slots s WHERE s.workspace = w.workspace) < $1)
            ORDER BY (SELECT count(*) FROM machina_slots s WHERE s.workspace = w.workspace),
                     (SELECT min(seq) FROM machina_queue q WHERE q.workspace = w.workspace)
            LIMIT 1 FOR UPDATE SKIP LOCKED
            """,
            limit,
            owner,
        )
        if workspace is None:
            return None
        if limit:
            # Counted again now that the row is ours: a claim committed meanwhile is seen.
            running = await conn.fetchval(
                "SELECT count(*) FROM machina_slots WHERE workspace = $1", workspace
            )
            if running >= limit:
                return None
        run_id = await conn.fetchval(
            """
            DELETE FROM machina_queue WHERE seq = (
                SELECT seq FROM machina_queue WHERE workspace = $1 AND (pinned_to IS NULL OR pinned_to = $2)
                ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)
            RETURNING run_id
            """,
            workspace,
            owner,
        )
        if run_id is None:
            return None
        self._work.set()  # there may be more
        taken = await conn.fetchval(
            "INSERT INTO machina_slots (workspace, run_id, owner) VALUES ($1, $2, $3) "
            "ON CONFLICT (workspace, run_id) DO NOTHING RETURNING 1",
            workspace,
            run_id,
            owner,
        )
        # A run queued twice (the sweep re-queued it while its creator did) and executing
        # already: that entry is spent, and the slot stays whose it is.
        return (workspace, run_id) if taken else None

    async def wait_for_work(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._work.wait()
        self._work.clear()

    async def queue_position(self, workspace: str, run_id: str) -> int:
        position = await self._run(lambda pool: pool.fetchval(_POSITION, workspace, run_id))
        return int(position or 0)

    def hold_slot(self, workspace: str, run_id: str) -> None:
        self._post("hold_slot", workspace, run_id, self._owner)

    def release_slot(self, workspace: str, run_id: str) -> None:
        self._post("release_slot", workspace, run_id, self._owner)

    # -- durable timers ----------------------------------------------------------------

    def set_timer(self, workspace: str, run_id: str, kind: str, due_at: float) -> None:
        self._post("set_timer", workspace, run_id, kind, due_at)

    def ensure_timer(self, workspace: str, run_id: str, kind: str, due_at: float) -> None:
        self._post("ensure_timer", workspace, run_id, kind, due_at)

    async def set_timer_now(self, workspace: str, run_id: str, kind: str, due_at: float) -> None:
        async def write(pool: Any) -> None:
            async with asyncio.timeout(SET_NOW_TIMEOUT_S):
                await pool.execute(_OPS["set_timer"], workspace, run_id, kind, due_at)

        try:
            await self._run(write)
        except Exception:  # away or slow: written with the other changes once it answers
            self.set_timer(workspace, run_id, kind, due_at)

    def cancel_timer(self, workspace: str, run_id: str, kind: str) -> None:
        self._post("cancel_timer", workspace, run_id, kind)

    def timer_fired(self, workspace: str, run_id: str, kind: str, token: str) -> None:
        self._post("timer_fired", workspace, run_id, kind, token)

    async def due_timers(self, skip: Collection[str] = ()) -> list[tuple[str, str, str, str]]:
        if self._pool is None or not self._connected.is_set():
            return []
        token = uuid.uuid4().hex
        now = self._clock()
        try:
            rows = await self._pool.fetch(
                """
                UPDATE machina_timers t SET claim_token = $1, claimed_until = $2 + $3
                FROM (SELECT workspace, run_id, kind FROM machina_timers
                      WHERE due_at <= $2 AND (claimed_until IS NULL OR claimed_until < $2)
                        AND NOT kind = ANY($4::text[])
                      ORDER BY due_at LIMIT 50 FOR UPDATE SKIP LOCKED) d
                WHERE t.workspace = d.workspace AND t.run_id = d.run_id AND t.kind = d.kind
                RETURNING t.workspace, t.run_id, t.kind
                """,
                token,
                now,
                TIMER_CLAIM_S,
                list(skip),
            )
        except DOWN:
            self._lost.set()
            return []
        return [(row[0], row[1], row[2], token) for row in rows]

    async def wait_for_timers(self, timeout: float) -> None:
        """Until a timer may be due: the earliest due time, a timer set anywhere, or ``timeout``."""
        if self._pool is not None and self._connected.is_set():
            try:
                due = await self._pool.fetchval(
                    "SELECT min(coalesce(greatest(due_at, claimed_until), due_at)) FROM machina_timers"
                )
            except DOWN:
                due = None
            except Exception:  # refused (too many connections, out of memory): wait the timeout
                log.warning("control plane: reading the next timer's due time failed", exc_info=True)
                due = None
            if due is not None:
                timeout = max(0.0, min(timeout, due - self._clock()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._timers.wait()
        self._timers.clear()

    # -- ordered changes ---------------------------------------------------------------

    def _post(self, op: str, *args: Any) -> None:
        self._ops.append((op, args))
        self._ops_wanted.set()

    async def _write_loop(self) -> None:
        """The one writer: queued index rows first, then queue, slot and timer changes in
        order (a run deleted after its last commit stays deleted)."""
        while True:
            await self._ops_wanted.wait()
            self._ops_wanted.clear()
            while self._unwritten():
                pool = self._pool
                if pool is None or not self._connected.is_set():
                    break  # written once connected again
                try:
                    await self._write_rows(pool)
                    await self._apply_ops(pool)
                except DOWN as exc:
                    log.warning("control plane: writes deferred (%s)", type(exc).__name__)
                    self._lost.set()
                    break
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("control plane: writing failed; will retry")
                    await asyncio.sleep(RECONNECT_S)

    async def _apply_ops(self, pool: Any) -> None:
        for _ in range(len(self._ops)):  # those posted so far; index rows queued meanwhile go first
            op, args = self._ops[0]
            try:
                await pool.execute(_OPS[op], *args)
            except DOWN:
                raise
            except Exception:
                log.exception("control plane: %s failed; dropped", op)
            self._ops.popleft()


async def _release_pinned(pool: Any, owners: list[str]) -> int:
    """Let any replica claim the queued runs pinned to ``owners``, and wake the claimers; how many."""
    moved = int(
        await pool.fetchval(
            "WITH moved AS (UPDATE machina_queue SET pinned_to = NULL WHERE pinned_to = ANY($1::text[]) "
            "RETURNING 1) SELECT count(*) FROM moved",
            owners,
        )
    )
    if moved:
        await pool.execute("SELECT pg_notify($1, '')", WORK_CHANNEL)
    return moved


_POSITION = (
    "SELECT count(*) FROM machina_queue WHERE workspace = $1 AND seq <= "
    "(SELECT seq FROM machina_queue WHERE workspace = $1 AND run_id = $2)"
)

_OPS = {
    "hold_slot": (
        "INSERT INTO machina_slots (workspace, run_id, owner) VALUES ($1, $2, $3) "
        "ON CONFLICT (workspace, run_id) DO UPDATE SET owner = EXCLUDED.owner, taken_at = EXCLUDED.taken_at"
    ),
    "release_slot": (
        "WITH gone AS (DELETE FROM machina_slots "
        "WHERE workspace = $1 AND run_id = $2 AND owner = $3 RETURNING 1) "
        "SELECT pg_notify('machina_work', '') FROM gone"
    ),
    "set_timer": (
        "WITH t AS (INSERT INTO machina_timers (workspace, run_id, kind, due_at) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (workspace, run_id, kind) DO UPDATE SET due_at = EXCLUDED.due_at, "
        "claim_token = NULL, claimed_until = NULL RETURNING 1) "
        "SELECT pg_notify('machina_timers', '') FROM t"
    ),
    "delete_run": (
        "WITH runs AS (DELETE FROM machina_runs WHERE workspace = $1 AND run_id = $2), "
        "queue AS (DELETE FROM machina_queue WHERE workspace = $1 AND run_id = $2), "
        "slots AS (DELETE FROM machina_slots WHERE workspace = $1 AND run_id = $2) "
        "DELETE FROM machina_timers WHERE workspace = $1 AND run_id = $2"
    ),
    "forget_unstored": (
        "WITH gone AS (DELETE FROM machina_runs "
        "WHERE workspace = $1 AND run_id = $2 AND created_at < $3 RETURNING 1), "
        "queue AS (DELETE FROM machina_queue "
        "WHERE workspace = $1 AND run_id = $2 AND EXISTS (SELECT 1 FROM gone)), "
        "slots AS (DELETE FROM machina_slots "
        "WHERE workspace = $1 AND run_id = $2 AND EXISTS (SELECT 1 FROM gone)) "
        "DELETE FROM machina_timers WHERE workspace = $1 AND run_id = $2 AND EXISTS (SELECT 1 FROM gone)"
    ),
    "ensure_timer": (
        "WITH t AS (INSERT INTO machina_timers (workspace, run_id, kind, due_at) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (workspace, run_id, kind) DO NOTHING RETURNING 1) "
        "SELECT pg_notify('machina_timers', '') FROM t"
    ),
    "cancel_timer": "DELETE FROM machina_timers WHERE workspace = $1 AND run_id = $2 AND kind = $3",
    "timer_fired": (
        "DELETE FROM machina_timers WHERE workspace = $1 AND run_id = $2 AND kind = $3 AND claim_token = $4"
    ),
}
