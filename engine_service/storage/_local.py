"""The local-directory storage adapter (the layout is described in ``_protocol``), and ``open_storage``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import itertools
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine_service.core._errors import missing_extra
from engine_service.core._ids import check_id
from engine_service.core._types import JsonObject
from engine_service.storage._protocol import (
    Checkpoint,
    StateConflict,
    Storage,
    doc_parts,
    segment_name,
    segment_starts,
)
from engine_service.storage._records import doc_span, dump_lines, dumps, loads, span
from engine_service.storage._workdir_snapshot import FILE_BLOB, MANIFEST_BLOB

SEGMENT_RECORDS = 4096
# Run directories (paths) and released runs remembered, at most.
_RUN_DIRS_KEPT = 4096
_TMP_NUMBERS = itertools.count()  # names temporary files apart
# Blobs of run-directory snapshots (see _workdir_snapshot): contents and manifests.
SNAPSHOT_BLOB_PREFIXES = (FILE_BLOB, MANIFEST_BLOB)
# A run's commit log: ``commits/{n}.jsonl``, one record a checkpoint, the newest whole record of
# the highest numbered file is the run's state.
COMMITS = "commits"
# Past this size a commit log is replaced by a new one starting with the newest record.
LOG_BYTES = 1 << 20
# Where runs written by earlier versions keep their later states: one file each, the highest
# number counting (read, never written now).
STATES = "states"
# A run in one of these states writes no more for now (or until it is resumed).
_FINAL = frozenset({"PAUSED", "DONE", "FAILED", "CANCELLED"})
# How much of a commit log's end is read at first to find its last record.
_TAIL_BYTES = 1 << 13
# fsync mode: a blob larger than this is synced on its own (in a thread) rather than carried by
# the commit record, which every reader of the run's state parses.
INLINE_BLOB_BYTES = 1 << 16


def _read_boot_id() -> str:
    """This boot of the machine: a record stamped with another one was written before a reboot
    (a power loss), so what it committed may be missing from the files it names."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"process-{secrets.token_hex(8)}"  # unknown: every other process counts as a reboot


BOOT_ID = _read_boot_id()


@dataclass(slots=True)
class _Appender:
    """The open newest segment of one stream of a run this process writes."""

    fd: int
    path: Path
    first: int
    next: int

    def close(self) -> None:
        os.close(self.fd)


@dataclass(slots=True)
class _Log:
    """The open commit log of a run this process writes."""

    fd: int
    path: Path
    number: int
    size: int
    # The state of the newest record this process wrote to it.
    state: JsonObject | None = None

    def close(self) -> None:
        os.close(self.fd)


@dataclass(slots=True)
class _Redo:
    """fsync mode: what a run wrote since its last commit that its next commit record carries."""

    events: list[tuple[int, list[JsonObject]]] = field(default_factory=list)
    transcript: list[tuple[int, list[JsonObject]]] = field(default_factory=list)
    # None: written and synced on its own (too large to carry); an older copy a record carries
    # must not be written back over it.
    blobs: dict[str, bytes | None] = field(default_factory=dict)

    def merge(self, later: _Redo) -> None:
        self.events += later.events
        self.transcript += later.transcript
        self.blobs.update(later.blobs)


class _GroupSync:
    """fsync mode: syncs the commit logs of runs that commit together in one pass (in a thread).

    A commit that arrives while a pass runs waits for the next one, which covers everyone
    waiting by then: runs checkpointing together share the file system's journal commits.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def sync(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        # A duplicate: the log may be replaced (and closed) while the pass runs.
        self._waiting.append((os.dup(fd), future))
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run())
        await future

    async def _run(self) -> None:
        batch: list[tuple[int, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                errors = await asyncio.to_thread(_datasync_all, [fd for fd, _ in batch])
                for (_, future), error in zip(batch, errors, strict=True):
                    if not future.done():
                        if error is None:
                            future.set_result(None)
                        else:
                            future.set_exception(error)
                batch = []
        except BaseException as exc:
            failed = OSError(f"the commit log was not synced ({exc!r})")
            waiting, self._waiting = self._waiting, []
            for fd, _ in waiting:
                os.close(fd)  # those of the batch are closed by the pass
            for _, future in [*batch, *waiting]:
                if not future.done():
                    future.set_exception(failed)
            raise


def _datasync_all(fds: list[int]) -> list[OSError | None]:
    """fdatasync each of ``fds`` (closing them); the error of each, None where it succeeded."""
    errors: list[OSError | None] = []
    for fd in fds:
        try:
            os.fdatasync(fd)
            errors.append(None)
        except OSError as exc:
            errors.append(exc)
        finally:
            os.close(fd)
    return errors


class LocalStorage:
    """Storage in a local directory. Atomic writes by write-to-temp + rename.

    A checkpoint appends the run's transcript entries to their segment and one record, its
    state, to the run's commit log (``commits/``); the newest whole record is the state.

    ``fsync`` makes each checkpoint durable against power loss (slower); without it writes
    survive a process crash, which is what kill -9 tests exercise. In fsync mode the commit
    record also carries what the checkpoint commits that was written since the run's previous
    one (its events, transcript entries and new blobs), and the log alone is synced: one
    ``fdatasync`` a checkpoint, shared by the runs that commit at the same moment. The segment
    and blob files are synced only when the log is replaced (past ``LOG_BYTES``); a record
    stamped by an earlier boot of the machine has what it carries rewritten into those files
    before its state is read (`_redo_after_reboot`, in a thread). Blobs larger than ``INLINE_BLOB_BYTES``
    are synced on their own (in a thread) instead of carried. The lease needs no sync: it
    names the boot that wrote it, and a lease of an earlier boot counts as expired.
    """

    event_flush_delay = 0.0

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self._root = Path(root).resolve()
        self._fsync = fsync
        self._root.mkdir(parents=True, exist_ok=True)
        self._appenders: dict[tuple[str, str, str], _Appender] = {}
        self._logs: dict[tuple[str, str], _Log] = {}
        # fsync mode: what each run wrote that its next commit record carries.
        self._redo: dict[tuple[str, str], _Redo] = {}
        self._group_sync = _GroupSync()
        # The owners this process took leases as (a reader redoes a run's commits after a
        # reboot only when no other process holds the run).
        self._owners: set[str] = set()
        self._run_dirs: dict[tuple[str, str], Path] = {}
        # Where this process left the streams of runs it released (the mark it left in the
        # lease, and each stream's last index) and, once it takes such a run back with the mark
        # still there (nobody wrote since), what repair_end and drop_uncommitted need not read.
        self._left: dict[tuple[str, str], tuple[str, dict[str, int], dict[str, int]]] = {}
        self._known_ends: dict[tuple[str, str], dict[str, int]] = {}
        # Of such a run taken back, the newest segment of each stream (its first index), which
        # the stream's next append goes on in instead of starting a segment (a file) of its own.
        self._continue_in: dict[tuple[str, str], dict[str, int]] = {}
        # Where the streams of runs this process writes end, as far as it knows.
        self._ends: dict[tuple[str, str], dict[str, int]] = {}
        # The owner this process holds each run's lease as: a writer whose lease another
        # process took must not move the run's commit log on.
        self._holders: dict[tuple[str, str], str] = {}

    @property
    def root(self) -> Path:
        return self._root

    def _run_dir(self, ws: str, run_id: str) -> Path:
        key = (ws, run_id)
        path = self._run_dirs.get(key)
        if path is None:
            path = (
                self._root / "workspaces" / check_id(ws, "workspace_id") / "runs" / check_id(run_id, "run_id")
            )
            if len(self._run_dirs) >= _RUN_DIRS_KEPT:
                self._run_dirs.clear()
            self._run_dirs[key] = path
        return path

    # The methods below do small synchronous file I/O directly on the event
    # loop: each is tens of microseconds on a local disk, far cheaper than a
    # thread hop, and it keeps per-turn overhead low.

    async def create_run(self, ws: str, run_id: str, spec: JsonObject, state: JsonObject) -> bool:
        run_dir = self._run_dir(ws, run_id)
        if self._fsync:
            # In a thread, whole: its syncs do not hold up the event loop, and a caller that gives
            # up meanwhile leaves a run created whole or not at all.
            return await asyncio.to_thread(self._create_run_dir, run_dir, dumps(spec), dumps(state))
        return self._create_run_dir(run_dir, dumps(spec), dumps(state))

    def _create_run_dir(self, run_dir: Path, spec: bytes, state: bytes) -> bool:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            run_dir.mkdir()
        except FileExistsError:
            return False
        try:
            self._write_atomic(run_dir / "spec.json", spec)
            self._write_atomic(run_dir / "state.json", state)
            if self._fsync:
                _fsync_dir(run_dir.parent)  # the run directory's own entry: CreateRun answers after this
        except BaseException:
            # A run is created whole or not at all: a retry must find no half-made run directory.
            for leftover in run_dir.iterdir():
                leftover.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
            raise
        return True

    async def read_spec(self, ws: str, run_id: str) -> JsonObject | None:
        return _read_json(self._run_dir(ws, run_id) / "spec.json")

    async def read_state(self, ws: str, run_id: str) -> JsonObject | None:
        run_dir = self._run_dir(ws, run_id)
        record = _newest(run_dir / COMMITS, _log_numbers, _log_name, _last_record)
        if record is None:  # not checkpointed yet, or written by an earlier version
            newest = _newest(run_dir / STATES, _state_numbers, _state_name, _whole_json)
            return newest if newest is not None else _read_json(run_dir / "state.json")
        if record.get("boot", BOOT_ID) != BOOT_ID:  # once per run after a power loss; it syncs
            record = await asyncio.to_thread(self._redo_after_reboot, ws, run_id) or record
        state: JsonObject = record["state"]
        return state

    async def write_state(self, ws: str, run_id: str, state: JsonObject) -> None:
        """Append ``state`` to the run's commit log (see `commit`)."""
        await self.commit(ws, run_id, Checkpoint(state))

    async def commit(self, ws: str, run_id: str, checkpoint: Checkpoint) -> None:
        """Append the checkpoint's events and transcript entries to their segments, write its
        blobs, then append its state to the run's commit log as one record (one line).

        Appending to an open file is far cheaper than creating one, and a reader never sees a
        torn state: a record still being written (or torn by a crash) does not parse and the one
        before it counts. In fsync mode the record carries the events, transcript entries and
        blobs written since the run's previous commit, and only the log is synced (see the
        class's docstring).
        """
        key = (ws, run_id)
        if checkpoint.events:  # not written ahead yet: appended like the writer's
            await self.write_segment(
                ws, run_id, "events", checkpoint.events[0]["seq"], list(checkpoint.events)
            )
        if checkpoint.transcript:
            await self.write_segment(
                ws, run_id, "transcript", checkpoint.transcript_first, list(checkpoint.transcript)
            )
        blobs = self._run_dir(ws, run_id) / "blobs"
        for name, data in checkpoint.blobs.items():
            blobs.mkdir(exist_ok=True)
            path = blobs / check_id(name, "blob name")
            if self._fsync and len(data) > INLINE_BLOB_BYTES:
                await asyncio.to_thread(self._write_atomic, path, data, sync=True)
                self._redo_of(key).blobs[name] = None
                continue
            self._write_atomic(path, data, sync=False)
            if self._fsync:
                self._redo_of(key).blobs[name] = data
        record: JsonObject = {"state": checkpoint.state}
        redo = self._redo.pop(key, None) if self._fsync else None
        if self._fsync:
            record = {"boot": BOOT_ID, "redo": _redo_doc(redo), "state": checkpoint.state}
        try:
            await self._append_record(key, record)
        except BaseException:
            if redo is not None:  # the retry carries it
                redo.merge(self._redo.pop(key, _Redo()))
                self._redo[key] = redo
            raise

    def _redo_of(self, key: tuple[str, str]) -> _Redo:
        redo = self._redo.get(key)
        if redo is None:
            redo = self._redo[key] = _Redo()
        return redo

    async def _append_record(self, key: tuple[str, str], record: JsonObject) -> None:
        log = self._logs.get(key)
        if log is not None:
            stat = os.fstat(log.fd)
            if stat.st_nlink == 0 or stat.st_size != log.size:
                # Another process replaced the log or appended to it: it took the run over (then
                # this one must stop), or this process's view of the log is stale.
                del self._logs[key]
                log.close()
                self._check_lease(key)
                log = None
        if log is None:
            log, unsynced = self._open_log(*key)
            if unsynced:  # the names of a new log (and its directory): synced before it is used
                try:
                    await asyncio.to_thread(_fsync_dirs, unsynced)
                except BaseException:
                    log.close()
                    raise
            self._logs[key] = log
        final = record["state"].get("state") in _FINAL
        if log.size and not self._fsync and final:
            # A pause or an end starts a new log holding only it: the run writes no more for
            # now, and keeps one record. Creating that file needs a writable directory and free
            # space: storage refusing writes holds back a pause or an end. Not in fsync mode,
            # where that would first sync every file the log carries.
            await self._replace_log(key, log, record)
            return
        if final:
            self._check_lease(key)  # a writer whose lease another took does not end the run
        data = dumps(record) + b"\n"
        try:
            _write_all(log.fd, data)
        except BaseException:
            # Cut back to the last whole record (never append after torn bytes), and reopen.
            del self._logs[key]
            log.close()
            with contextlib.suppress(OSError):
                os.truncate(log.path, log.size)
            raise
        log.size += len(data)
        log.state = record["state"]
        if self._fsync:
            await self._group_sync.sync(log.fd)
        if log.size > LOG_BYTES:
            await self._replace_log(key, log, {"boot": BOOT_ID, "state": log.state} if self._fsync else None)

    def _open_log(self, ws: str, run_id: str) -> tuple[_Log, list[Path]]:
        """The run's newest commit log, opened for appending (its torn end cut off); a new one
        if it has none. In fsync mode, with the directories whose new entries must be synced
        before it is used."""
        directory = self._run_dir(ws, run_id) / COMMITS
        unsynced: list[Path] = []
        try:
            numbers = _log_numbers(os.listdir(directory))
        except FileNotFoundError:
            directory.mkdir()
            unsynced.append(directory.parent)
            numbers = []
        if not numbers:
            path = directory / _log_name(1)
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            unsynced.append(directory)
            return _Log(fd, path, 1, os.fstat(fd).st_size), unsynced if self._fsync else []
        path = directory / _log_name(numbers[-1])
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        try:
            size = _whole_size(fd)
            if size != os.fstat(fd).st_size:
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return _Log(fd, path, numbers[-1], size), []

    async def _replace_log(self, key: tuple[str, str], log: _Log, record: JsonObject | None) -> None:
        """Start a new commit log holding only ``record``'s state (None: the newest record's),
        and remove the old one. In fsync mode what the old one's records and ``record`` carry
        is synced into its own files first, so the new log carries nothing.

        StateConflict if another process holds the run's lease or moved the log on meanwhile."""
        state = record["state"] if record is not None else log.state
        run_dir = self._run_dir(*key)
        if self._fsync:
            records = _whole_records(log.path)
            if record is not None and record.get("redo"):
                records.append(record)
            await asyncio.to_thread(_sync_carried, run_dir, records)
            record = {"boot": BOOT_ID, "state": state}
        else:
            record = {"state": state}
        data = dumps(record) + b"\n"
        path = log.path.with_name(_log_name(log.number + 1))
        with self._locked(run_dir):  # no process takes the lease between the check and the file
            self._check_lease(key, locked=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                del self._logs[key]
                log.close()
                raise StateConflict(f"run {key[1]}: its commit log was moved on by another writer") from None
            try:
                _write_all(fd, data)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    path.unlink()  # a full disk must not keep what it could not take
                raise
        try:
            if self._fsync:
                await asyncio.to_thread(_sync_new, fd, path.parent)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._logs[key] = _Log(fd, path, log.number + 1, len(data), state)
        log.close()
        with contextlib.suppress(OSError):
            log.path.unlink()

    def _check_lease(self, key: tuple[str, str], *, locked: bool = False) -> None:
        """StateConflict if this process took the run's lease and another process holds it now
        (nothing to check for a run written without a lease)."""
        owner = self._holders.get(key)
        if owner is None:
            return
        run_dir = self._run_dir(*key)
        with contextlib.nullcontext() if locked else self._locked(run_dir):
            current = _read_lease(run_dir / "lease.json")
        if current is None or current["owner"] != owner:
            self._forget_writes(key)
            raise StateConflict(f"run {key[1]} is now moved by another process")

    def _forget_writes(self, key: tuple[str, str]) -> None:
        """Drop what this process knows of the files of a run it writes (another process may
        have moved them on)."""
        for stream in ("events", "transcript"):
            appender = self._appenders.pop((*key, stream), None)
            if appender is not None:
                appender.close()
        log = self._logs.pop(key, None)
        if log is not None:
            log.close()
        for cache in (self._redo, self._ends, self._known_ends, self._continue_in):
            cache.pop(key, None)

    def _redo_after_reboot(self, ws: str, run_id: str) -> JsonObject | None:
        """The run's newest commit record was written before the machine rebooted (a power loss):
        what the records of its log carry may be missing from the files they name. Write it into
        them (what is there is kept), sync, and append a record stamped with this boot, so this
        is done once. Only while no other process holds the run (it did this when it took it).

        Returns the newest record after it (None if another process holds the run)."""
        run_dir = self._run_dir(ws, run_id)
        with self._locked(run_dir):
            lease = _read_lease(run_dir / "lease.json")
            if lease is not None and _live(lease, time.time()) and lease["owner"] not in self._owners:
                return None
            try:
                numbers = _log_numbers(os.listdir(run_dir / COMMITS))
            except FileNotFoundError:
                numbers = []
            if not numbers:  # the run was deleted meanwhile
                return None
            path = run_dir / COMMITS / _log_name(numbers[-1])
            records = _whole_records(path)
            if not records or records[-1].get("boot", BOOT_ID) == BOOT_ID:
                return records[-1] if records else None  # done meanwhile
            _redo_into_files(run_dir, records)
            sealed = {"boot": BOOT_ID, "state": records[-1]["state"]}
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
            try:
                os.ftruncate(fd, _whole_size(fd))
                _write_all(fd, dumps(sealed) + b"\n")
                os.fdatasync(fd)
            finally:
                os.close(fd)
            # What this process knew of the run's files is stale now.
            key = (ws, run_id)
            for cache in (self._ends, self._known_ends, self._left, self._continue_in):
                cache.pop(key, None)
            log = self._logs.pop(key, None)
            if log is not None:
                log.close()
            return sealed

    async def write_segment(
        self, ws: str, run_id: str, stream: str, first: int, records: list[JsonObject]
    ) -> None:
        if not records:
            return
        key = (ws, run_id, _stream(stream))
        appender = self._appenders.get(key) or self._reopened(ws, run_id, key[2], first)
        if appender is None or appender.next != first or appender.next - appender.first >= SEGMENT_RECORDS:
            if appender is not None:
                del self._appenders[key]
                appender.close()
            directory = self._run_dir(ws, run_id) / key[2]
            if not directory.is_dir():
                directory.mkdir(exist_ok=True)
            path = directory / segment_name(first)
            if path.exists():
                # Only a retry reopens a segment named ``first``: of a failed append (never append
                # after torn bytes) or of a commit that failed later (never append twice).
                os.truncate(path, 0)
            # Kept open across checkpoints (closed on release/close): appends are cheap, opens are not.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            appender = _Appender(fd, path, first, first)
            self._appenders[key] = appender
        data = dump_lines(records)
        whole = os.fstat(appender.fd).st_size  # the end of the last whole record
        try:
            _write_all(appender.fd, data)
        except BaseException:
            # A failed append (disk full, I/O error) may have left part of the batch. Cut the
            # segment back to its last whole record so a retry appends after it, never after
            # torn bytes; if even that fails, the retry starts a new segment (see read_segments).
            del self._appenders[key]
            self._ends.get((ws, run_id), {}).pop(key[2], None)  # unknown now
            appender.close()
            with contextlib.suppress(OSError):
                os.truncate(appender.path, whole)
            raise
        if self._fsync:
            redo = self._redo_of((ws, run_id))
            (redo.events if key[2] == "events" else redo.transcript).append((first, records))
        appender.next += sum(doc_span(r) for r in records)

    def _reopened(self, ws: str, run_id: str, stream: str, first: int) -> _Appender | None:
        """The segment this process left newest when it released the run, open again to append
        ``first`` on, if it took the run back with nobody having written since and the stream
        still ends right before ``first`` (its first append since); else None."""
        start = self._continue_in.get((ws, run_id), {}).pop(stream, None)
        if start is None or self._ends.get((ws, run_id), {}).get(stream) != first - 1:
            return None
        path = self._run_dir(ws, run_id) / stream / segment_name(start)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            return None
        appender = self._appenders[(ws, run_id, stream)] = _Appender(fd, path, start, first)
        return appender

    async def read_segments(
        self, ws: str, run_id: str, stream: str, after: int, upto: int
    ) -> list[JsonObject]:
        if upto <= after:
            return []
        directory = self._run_dir(ws, run_id) / _stream(stream)
        try:
            starts = segment_starts(os.listdir(directory))
        except FileNotFoundError:
            return []
        out: list[JsonObject] = []
        for i, first in enumerate(starts):
            end = min(starts[i + 1] - 1, upto) if i + 1 < len(starts) else upto
            if end <= after or first > upto:
                continue
            with open(directory / segment_name(first), "rb") as fh:
                index = first  # of the line's first record: a line may stand for several
                for line in fh:
                    # A segment ends where the next begins, or at a torn last line (an append
                    # that failed and could not be cut back; its retry began a new segment).
                    if index > end or not line.endswith(b"\n"):
                        break
                    n = span(line)
                    if index + n - 1 > after:
                        out.append(loads(line))
                    index += n
        return out

    def _reopen(self, ws: str, run_id: str, stream: str) -> tuple[Path, list[int]]:
        """Forget this process's open segment of ``stream``; its directory and segment starts."""
        key = (ws, run_id, _stream(stream))
        appender = self._appenders.pop(key, None)
        if appender is not None:
            appender.close()
        directory = self._run_dir(ws, run_id) / key[2]
        try:
            return directory, segment_starts(os.listdir(directory))
        except FileNotFoundError:
            return directory, []

    async def drop_uncommitted(self, ws: str, run_id: str, stream: str, committed: int) -> None:
        ends = self._ends.setdefault((ws, run_id), {})
        if self._known_ends.get((ws, run_id), {}).pop(stream, None) == committed:
            ends[stream] = committed
            return  # the stream ends where this process left it: nothing past ``committed``
        directory, starts = self._reopen(ws, run_id, stream)
        kept = [first for first in starts if first <= committed]
        for first in starts[len(kept) :]:
            (directory / segment_name(first)).unlink(missing_ok=True)
        ends[stream] = 0
        if kept:
            last = kept[-1]
            ends[stream] = last - 1 + _truncate_after(directory / segment_name(last), committed - last + 1)

    async def repair_end(self, ws: str, run_id: str, stream: str) -> int:
        ends = self._ends.setdefault((ws, run_id), {})
        known = self._known_ends.get((ws, run_id), {}).pop(stream, None)
        if known is not None:
            ends[stream] = known
            return known  # where this process left it, whole: nobody wrote since
        directory, starts = self._reopen(ws, run_id, stream)
        end = 0
        if starts:
            end = starts[-1] - 1 + _truncate_after(directory / segment_name(starts[-1]), 1 << 62)
            if self._fsync:
                # What the writer before wrote past its last commit stays (watchers may have
                # seen it) but no commit record carries it: sync it, or a power loss would
                # leave a gap before what this writer commits next.
                await asyncio.to_thread(_sync_segments, directory, starts)
        ends[stream] = end
        return end

    async def put_blob(self, ws: str, run_id: str, name: str, data: bytes) -> None:
        directory = self._run_dir(ws, run_id) / "blobs"
        path = directory / check_id(name, "blob name")
        directory.mkdir(exist_ok=True)
        # A snapshot's blob counts once a state names it: in fsync mode the commit record of
        # that state carries it, so it is not synced on its own.
        snapshot = name.startswith(SNAPSHOT_BLOB_PREFIXES)
        if snapshot and self._fsync and len(data) > INLINE_BLOB_BYTES:
            await asyncio.to_thread(self._write_atomic, path, data, sync=True)  # too large to carry
            return
        if not snapshot:
            await self._write_durably(path, data)
            return
        if not _write_new(path, data):
            # Named by its content's digest, never rewritten, and checked against that digest
            # when read back: created in place, without a temporary file and a rename (one there
            # already was torn by a crash: rewritten whole). Only a state written after it names
            # it, so a reader never meets one half-written.
            self._write_atomic(path, data, sync=False)
        if self._fsync:
            self._redo_of((ws, run_id)).blobs[name] = data

    async def get_blob(self, ws: str, run_id: str, name: str) -> bytes | None:
        try:
            return (self._run_dir(ws, run_id) / "blobs" / check_id(name, "blob name")).read_bytes()
        except FileNotFoundError:
            return None

    async def put_shared(self, name: str, doc: JsonObject) -> None:
        directory = self._root / "shared"
        directory.mkdir(exist_ok=True)
        await self._write_durably(directory / f"{check_id(name, 'shared name')}.json", dumps(doc))

    async def get_shared(self, name: str) -> JsonObject | None:
        return _read_json(self._root / "shared" / f"{check_id(name, 'shared name')}.json")

    async def list_workspaces(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self._root / "workspaces") if not n.startswith("."))
        except FileNotFoundError:
            return []

    async def list_runs(self, ws: str) -> list[str]:
        runs = self._root / "workspaces" / check_id(ws, "workspace_id") / "runs"
        try:
            return [name for name in os.listdir(runs) if not name.startswith(".")]
        except FileNotFoundError:
            return []

    async def put_if_absent(self, ws: str, key: str, doc: JsonObject) -> JsonObject | None:
        directory = self._root / "workspaces" / check_id(ws, "workspace_id") / "requests"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{check_id(key, 'request_id')}.json"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            # The creator may still be writing it: wait briefly for the content.
            for _ in range(50):
                existing = _read_json(path)
                if existing is not None:
                    return existing
                await asyncio.sleep(0.01)
            raise
        if self._fsync:
            # In a thread, whole (its syncs would hold up the event loop): a caller that gives up
            # meanwhile leaves the key written or removed, never empty.
            await asyncio.to_thread(_fill_key, fd, path, dumps(doc), True)
        else:
            _fill_key(fd, path, dumps(doc), False)
        return None

    async def delete_request_key(self, ws: str, key: str) -> None:
        directory = self._root / "workspaces" / check_id(ws, "workspace_id") / "requests"
        (directory / f"{check_id(key, 'request_id')}.json").unlink(missing_ok=True)

    def _docs(self, ws: str) -> Path:
        return self._root / "workspaces" / check_id(ws, "workspace_id") / "docs"

    def _doc_path(self, ws: str, key: str) -> Path:
        *folders, name = doc_parts(key)
        return self._docs(ws).joinpath(*folders, f"{name}.json")

    async def put_doc(self, ws: str, key: str, doc: JsonObject, *, create_only: bool = False) -> bool:
        path = self._doc_path(ws, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not create_only:
            await self._write_durably(path, dumps(doc))
            return True
        if self._fsync:
            return await asyncio.to_thread(self._create_doc, path, dumps(doc))
        return self._create_doc(path, dumps(doc))

    def _create_doc(self, path: Path, data: bytes) -> bool:
        # Written aside, then linked into place: link fails if the name exists, and readers
        # never see a half-written document.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_TMP_NUMBERS)}.tmp")
        self._write_atomic(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        if self._fsync:
            _fsync_dir(path.parent)
        return True

    async def get_doc(self, ws: str, key: str) -> JsonObject | None:
        return _read_json(self._doc_path(ws, key))

    async def list_docs(self, ws: str, prefix: str) -> list[str]:
        base = self._docs(ws)
        top = base.joinpath(*doc_parts(prefix))
        keys = []
        for directory, _subdirs, files in os.walk(top):
            rel = Path(directory).relative_to(base).parts
            for name in files:
                if name.endswith(".json") and not name.startswith("."):
                    keys.append("/".join((*rel, name.removesuffix(".json"))))
        return sorted(keys)

    async def delete_doc(self, ws: str, key: str) -> None:
        path = self._doc_path(ws, key)
        path.unlink(missing_ok=True)
        # Empty folders go too: what is deleted leaves nothing behind.
        base = self._docs(ws)
        parent = path.parent
        while parent != base and base in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    async def delete_run(self, ws: str, run_id: str) -> None:
        key = (ws, run_id)
        for stream in ("events", "transcript"):
            appender = self._appenders.pop((ws, run_id, stream), None)
            if appender is not None:
                appender.close()
        log = self._logs.pop(key, None)
        if log is not None:
            log.close()
        run_dir = self._run_dir(ws, run_id)
        # Nothing this process remembers of the run outlives it.
        for cache in (
            self._redo,
            self._run_dirs,
            self._left,
            self._known_ends,
            self._continue_in,
            self._ends,
            self._holders,
        ):
            cache.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(run_dir)

    async def acquire_lease(self, ws: str, run_id: str, owner: str, ttl: float) -> bool:
        key = (ws, run_id)
        run_dir = self._run_dir(ws, run_id)
        now = time.time()
        with self._locked(run_dir):
            # Rewritten in place under the lock, unsynced: only holders of the lock read it, and
            # it names the boot that took it (a lease of an earlier boot has expired: no process
            # of that boot runs). A torn one reads as none.
            fd = os.open(run_dir / "lease.json", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                current = _parse_lease(os.pread(fd, os.fstat(fd).st_size, 0))
                if current is not None and current["owner"] != owner and _live(current, now):
                    return False
                if current is None or current["owner"] != owner or current.get("boot", BOOT_ID) != BOOT_ID:
                    # Taken over (or first taken): what this process knew of the run's files
                    # may be stale, another process may have written them since.
                    self._forget_writes(key)
                left = self._left.pop(key, None)
                if left is not None and current is not None and current.get("left") == left[0]:
                    self._known_ends[key] = left[1]  # our own mark: nobody took the run since
                    self._continue_in[key] = left[2]
                data = dumps({"owner": owner, "expires_at": now + ttl, "boot": BOOT_ID})
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
            finally:
                os.close(fd)
            self._owners.add(owner)
            self._holders[key] = owner
            return True

    async def renew_lease(self, ws: str, run_id: str, owner: str, ttl: float) -> bool:
        run_dir = self._run_dir(ws, run_id)
        try:
            with self._locked(run_dir):
                fd = os.open(run_dir / "lease.json", os.O_RDWR)
                try:
                    current = _parse_lease(os.pread(fd, os.fstat(fd).st_size, 0))
                    if not _still_held_by(current, owner):
                        return False
                    data = dumps({"owner": owner, "expires_at": time.time() + ttl, "boot": BOOT_ID})
                    os.pwrite(fd, data, 0)
                    os.ftruncate(fd, len(data))
                finally:
                    os.close(fd)
        except FileNotFoundError:  # the run (or its lease) is gone
            return False
        return True

    async def release_lease(self, ws: str, run_id: str, owner: str) -> None:
        key = (ws, run_id)
        ends = self._ends.pop(key, {})
        self._known_ends.pop(key, None)
        self._holders.pop(key, None)
        self._continue_in.pop(key, None)
        segments = {}
        for stream in ("events", "transcript"):
            appender = self._appenders.pop((ws, run_id, stream), None)
            if appender is not None:
                ends[stream] = appender.next - 1
                segments[stream] = appender.first
                appender.close()
        self._redo.pop(key, None)
        log = self._logs.pop(key, None)
        if log is not None:
            log.close()
        run_dir = self._run_dir(ws, run_id)
        with self._locked(run_dir):
            current = _read_lease(run_dir / "lease.json")
            if current and current["owner"] == owner:
                # Expired, with a mark: if it is still there when this process takes the run
                # back, nobody wrote since and the streams end where they are known to.
                mark = secrets.token_hex(8)
                data = dumps({"owner": owner, "expires_at": 0, "left": mark, "boot": BOOT_ID})
                fd = os.open(run_dir / "lease.json", os.O_WRONLY)
                try:
                    os.pwrite(fd, data, 0)
                    os.ftruncate(fd, len(data))
                finally:
                    os.close(fd)
                if len(ends) == 2:
                    if len(self._left) >= _RUN_DIRS_KEPT:
                        self._left.clear()
                    self._left[key] = (mark, ends, segments)

    async def close(self) -> None:
        # What was committed is in the commit logs (synced in fsync mode); what was not is
        # dropped by each run's next writer.
        self._redo.clear()
        appenders, self._appenders = list(self._appenders.values()), {}
        for appender in appenders:
            appender.close()
        logs, self._logs = list(self._logs.values()), {}
        for log in logs:
            log.close()

    @contextlib.contextmanager
    def _locked(self, run_dir: Path) -> Iterator[None]:
        # flock gives processes sharing the directory an atomic compare-and-set.
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write_atomic(self, path: Path, data: str | bytes, *, sync: bool | None = None) -> None:
        """Write ``path`` whole (temporary file, rename); synced with its name in fsync mode
        unless ``sync`` is False."""
        sync = self._fsync if sync is None else sync
        # Unique per write: writes that sync go to a thread, and two may write one name at once.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_TMP_NUMBERS)}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data.encode() if isinstance(data, str) else data)
                if sync:
                    fh.flush()
                    os.fdatasync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # a full disk must not keep what it could not take
            raise
        if sync:
            _fsync_dir(path.parent)

    async def _write_durably(self, path: Path, data: str | bytes) -> None:
        """`_write_atomic`, in a thread when it syncs (milliseconds the event loop's other runs
        must not wait for)."""
        if self._fsync:
            await asyncio.to_thread(self._write_atomic, path, data, sync=True)
        else:
            self._write_atomic(path, data, sync=False)


def _write_new(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data``; False if it exists (possibly torn by a crash: the caller
    rewrites it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        written = os.write(fd, data)
        while written < len(data):
            written += os.write(fd, data[written:])
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()  # a full disk must not keep what it could not take
        raise
    finally:
        os.close(fd)
    return True


def _fill_key(fd: int, path: Path, data: bytes, sync: bool) -> None:
    """Write a request key just created as ``fd`` (removed again if that fails: an empty key
    would block every retry)."""
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        if sync:
            _fsync_dir(path.parent)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    while written < len(data):  # a short write: the rest, or the error that stopped it
        written += os.write(fd, data[written:])


def _sync_new(fd: int, directory: Path) -> None:
    """Sync a new file's content and its name in ``directory``."""
    os.fdatasync(fd)
    _fsync_dir(directory)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dirs(directories: list[Path]) -> None:
    for directory in directories:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _truncate_after(path: Path, keep: int) -> int:
    """Keep the first ``keep`` records of ``path``, whole lines only (drops a torn or
    uncommitted tail).

    Returns how many records were kept.
    """
    size = kept = 0
    with open(path, "rb") as fh:
        for line in fh:
            n = span(line)  # a line may stand for several records (indexes)
            if kept + n > keep or not line.endswith(b"\n"):
                break
            size += len(line)
            kept += n
    if os.path.getsize(path) != size:
        os.truncate(path, size)
    return kept


def _stream(name: str) -> str:
    if name not in ("events", "transcript"):
        raise ValueError(f"unknown stream {name!r}")
    return name


def _read_json(path: Path) -> JsonObject | None:
    try:
        with open(path, "rb") as fh:
            doc: JsonObject = loads(fh.read())
            return doc
    except FileNotFoundError:
        return None


def _state_name(number: int) -> str:
    return f"{number:012d}.json"


def _log_name(number: int) -> str:
    return f"{number:012d}.jsonl"


def _log_numbers(names: list[str]) -> list[int]:
    return sorted(int(n[:-6]) for n in names if n.endswith(".jsonl") and n[:-6].isdigit())


def _whole_size(fd: int) -> int:
    """The size of the file ``fd`` up to the end of its last whole line (a torn end cut off)."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - _TAIL_BYTES)
        at = os.pread(fd, end - start, start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def _last_record(path: Path) -> JsonObject | None:
    """The newest whole record of the commit log ``path`` (None if it has none)."""
    with open(path, "rb") as fh:
        fd = fh.fileno()
        size = os.fstat(fd).st_size
        want = _TAIL_BYTES
        while True:
            start = max(0, size - want)
            lines = os.pread(fd, size - start, start).split(b"\n")
            # The last piece is torn (or empty); the first may be the end of an earlier line.
            candidates = lines[:-1] if start == 0 else lines[1:-1]
            for line in reversed(candidates):
                try:
                    record = loads(line)
                except ValueError:
                    continue  # torn by a crash (or still being written): the one before counts
                if isinstance(record, dict) and isinstance(record.get("state"), dict):
                    return record
            if start == 0:
                return None
            want *= 4


def _whole_records(path: Path) -> list[JsonObject]:
    """The records of the commit log ``path`` up to the first torn one."""
    records = []
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            try:
                record = loads(line)
            except ValueError:
                break
            if not isinstance(record, dict) or not isinstance(record.get("state"), dict):
                break
            records.append(record)
    return records


def _redo_doc(redo: _Redo | None) -> JsonObject:
    """What a commit record carries (fsync mode): pieces of each stream, blobs in base64."""
    doc: JsonObject = {}
    if redo is None:
        return doc
    if redo.events:
        doc["events"] = [[first, records] for first, records in redo.events]
    if redo.transcript:
        doc["transcript"] = [[first, records] for first, records in redo.transcript]
    carried = {name: base64.b64encode(data).decode() for name, data in redo.blobs.items() if data is not None}
    if carried:
        doc["blobs"] = carried
    synced = sorted(name for name, data in redo.blobs.items() if data is None)
    if synced:
        doc["synced"] = synced  # an older copy an earlier record carries is not written back
    return doc


def _redo_into_files(run_dir: Path, records: list[JsonObject]) -> None:
    """Write what ``records`` carry into the run's segments and blobs where it is missing, and
    sync what was written (after a power loss)."""
    synced: set[Path] = set()
    for stream in ("events", "transcript"):
        by_index: dict[int, JsonObject] = {}
        for record in records:
            for first, docs in record.get("redo", {}).get(stream, []):
                index = first
                for doc in docs:
                    by_index[index] = doc
                    index += doc_span(doc)
        if not by_index:
            continue
        directory = run_dir / stream
        if not directory.is_dir():
            directory.mkdir()
            synced.add(run_dir)
        starts = segment_starts(os.listdir(directory))
        end = 0
        if starts:
            end = starts[-1] - 1 + _truncate_after(directory / segment_name(starts[-1]), 1 << 62)
        # Every contiguous run of what the records carry past the end, each a segment of its
        # own: a gap (records nobody carried or synced) loses what it lost, not what follows.
        pieces: list[tuple[int, list[JsonObject]]] = []
        expected = -1
        for index in sorted(i for i in by_index if i > end):
            if index != expected:
                pieces.append((index, []))
            pieces[-1][1].append(by_index[index])
            expected = index + doc_span(by_index[index])
        for first, docs in pieces:
            path = directory / segment_name(first)
            with open(path, "wb") as fh:  # a new segment, or an empty one left by the crash
                fh.write(dump_lines(docs))
                fh.flush()
                os.fdatasync(fh.fileno())
            synced.add(directory)
    blobs: dict[str, str] = {}
    for record in records:
        for name in record.get("redo", {}).get("synced", []):
            blobs.pop(name, None)  # written and synced on its own later: that copy counts
        blobs.update(record.get("redo", {}).get("blobs", {}))
    if blobs:
        directory = run_dir / "blobs"
        if not directory.is_dir():
            directory.mkdir()
            synced.add(run_dir)
        for name, encoded in blobs.items():
            data = base64.b64decode(encoded)
            path = directory / check_id(name, "blob name")
            try:
                if path.read_bytes() == data:
                    continue
            except FileNotFoundError:
                pass
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fdatasync(fh.fileno())
            os.replace(tmp, path)
            synced.add(directory)
    for directory in sorted(synced, key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(directory)


def _sync_carried(run_dir: Path, records: list[JsonObject]) -> None:
    """Sync the segments and blobs ``records`` carry, and the directories naming them: once
    done, no record need carry them any more."""
    for stream in ("events", "transcript"):
        pieces = [piece for record in records for piece in record.get("redo", {}).get(stream, [])]
        if not pieces:
            continue
        low = min(first for first, _ in pieces)
        directory = run_dir / stream
        starts = segment_starts(os.listdir(directory))
        # Every segment holding an index from ``low`` on: the last starting at or before it, and
        # those after.
        before = [first for first in starts if first <= low]
        _sync_segments(directory, starts[starts.index(before[-1]) if before else 0 :])
    names = {name for record in records for name in record.get("redo", {}).get("blobs", {})}
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            _fsync_path(run_dir / "blobs" / name)
    if names:
        _fsync_dir(run_dir / "blobs")
    _fsync_dir(run_dir)


def _sync_segments(directory: Path, starts: list[int]) -> None:
    """Sync the segments of ``directory`` starting at ``starts``, and their names."""
    for first in starts:
        _fsync_path(directory / segment_name(first))
    _fsync_dir(directory)


def _state_numbers(names: list[str]) -> list[int]:
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def _newest(
    directory: Path,
    numbers: Callable[[list[str]], list[int]],
    name: Callable[[int], str],
    read: Callable[[Path], JsonObject | None],
) -> JsonObject | None:
    """What ``read`` finds in the highest numbered file of ``directory`` that holds something
    whole (commit logs, or the state files of earlier versions); None if none does."""
    for _ in range(3):
        try:
            listed = numbers(os.listdir(directory))
        except FileNotFoundError:
            return None
        removed = False
        for number in reversed(listed):
            try:
                doc = read(directory / name(number))
            except FileNotFoundError:
                removed = True  # replaced since the listing: a newer one exists
                continue
            if doc is not None:
                return doc
        if not removed:
            return None
        # Every file listed was removed meanwhile: list again to find the newer one.
    return None


def _whole_json(path: Path) -> JsonObject | None:
    """The document of ``path``; None if it is torn by a crash (or still being written)."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        doc: JsonObject = loads(data)
        return doc
    except ValueError:
        return None


def _read_lease(path: Path) -> JsonObject | None:
    try:
        with open(path, "rb") as fh:
            return _parse_lease(fh.read())
    except FileNotFoundError:
        return None


def _parse_lease(data: bytes) -> JsonObject | None:
    if not data:
        return None
    try:
        doc: JsonObject = loads(data)
        return doc
    except ValueError:
        return None  # torn by a power loss (it is rewritten in place): no live lease


def _still_held_by(lease: JsonObject | None, owner: str) -> bool:
    """Whether ``owner`` can extend ``lease``: its own, taken in this boot, not released (a
    released lease carries a ``left`` mark). Expired is fine: nobody took it since."""
    return (
        lease is not None
        and lease["owner"] == owner
        and lease.get("boot", BOOT_ID) == BOOT_ID
        and "left" not in lease
    )


def _live(lease: JsonObject, now: float) -> bool:
    """Whether ``lease`` is held: not expired, and taken since the machine last booted (no
    process of an earlier boot runs any more)."""
    return bool(lease["expires_at"] > now) and lease.get("boot", BOOT_ID) == BOOT_ID


def open_storage(url: str, *, fsync: bool = False) -> Storage:
    """Storage from a URL: ``file:///abs/dir``, a plain path, or ``s3://bucket/prefix``."""
    if url.startswith("file://"):
        return LocalStorage(url.removeprefix("file://"), fsync=fsync)
    if url.startswith("s3://"):
        try:
            from engine_service.storage._s3 import S3Storage
        except ModuleNotFoundError as exc:
            raise missing_extra("aioboto3", "s3", "S3 storage", exc) from None

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError("an s3:// storage URL needs a bucket: s3://bucket/prefix")
        return S3Storage(bucket, prefix)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ValueError(
            f"unsupported storage URL scheme {scheme!r}: use file:///abs/dir, a path or s3://bucket/prefix"
        )
    return LocalStorage(url, fsync=fsync)
