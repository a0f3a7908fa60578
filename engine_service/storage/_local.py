"""The local-directory storage adapter (the layout is described in ``_protocol``), and ``open_storage``."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine_service.core._errors import missing_extra
from engine_service.core._ids import check_id
from engine_service.core._types import JsonObject
from engine_service.storage._protocol import (
    Checkpoint,
    Storage,
    commit_in_steps,
    doc_parts,
    segment_name,
    segment_starts,
)
from engine_service.storage._records import doc_span, dump_lines, dumps, loads, span
from engine_service.storage._workdir_snapshot import FILE_BLOB, MANIFEST_BLOB

SEGMENT_RECORDS = 4096
# Run directories (paths) and released runs remembered, at most.
_RUN_DIRS_KEPT = 4096
# Blobs of run-directory snapshots (see _workdir_snapshot): contents and manifests.
SNAPSHOT_BLOB_PREFIXES = (FILE_BLOB, MANIFEST_BLOB)
# A run's states after the first: one new file per checkpoint, the highest number wins.
STATES = "states"
# Older state files are removed in batches of this many.
STATES_KEPT = 16
# What a run in one of these states keeps of its state files: it writes no more of them
# (or none until it is resumed).
FINAL_STATES_KEPT = 1
_FINAL = frozenset({"PAUSED", "DONE", "FAILED", "CANCELLED"})


@dataclass(slots=True)
class _Appender:
    """The open newest segment of one stream of a run this process writes."""

    fd: int
    path: Path
    first: int
    next: int
    # Appends so far, and how many of them the last fdatasync covered (fsync mode): the next
    # state write syncs what is not covered first.
    appended: int = 0
    synced: int = 0
    # Directories whose new entries (this file, its directory) are not synced yet (fsync mode).
    new_entries: tuple[Path, ...] = ()

    def close(self) -> None:
        os.close(self.fd)


@dataclass(slots=True)
class _States:
    """The state files of a run this process writes: the next number, the oldest not removed."""

    next: int
    oldest: int


class LocalStorage:
    """Storage in a local directory. Atomic writes by write-to-temp + rename.

    ``fsync`` makes each checkpoint durable against power loss (slower); without
    it writes survive a process crash, which is what kill -9 tests exercise. A
    checkpoint syncs each segment file it appended to once (``fdatasync``), right
    before the state document that commits them, however many appends it took;
    the lease needs no sync (after a power loss every lease has expired).
    """

    event_flush_delay = 0.0

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self._root = Path(root).resolve()
        self._fsync = fsync
        self._root.mkdir(parents=True, exist_ok=True)
        self._appenders: dict[tuple[str, str, str], _Appender] = {}
        self._states: dict[tuple[str, str], _States] = {}
        # fsync mode: directories of a run holding new names that its next state write syncs.
        self._unsynced_dirs: dict[tuple[str, str], set[Path]] = {}
        # fsync mode: new snapshot blobs of a run that its next state write syncs.
        self._unsynced_files: dict[tuple[str, str], set[Path]] = {}
        self._run_dirs: dict[tuple[str, str], Path] = {}
        # Where this process left the streams of runs it released (the mark it left in the
        # lease, and each stream's last index) and, once it takes such a run back with the mark
        # still there (nobody wrote since), what repair_end and drop_uncommitted need not read.
        self._left: dict[tuple[str, str], tuple[str, dict[str, int]]] = {}
        self._known_ends: dict[tuple[str, str], dict[str, int]] = {}
        # Where the streams of runs this process writes end, as far as it knows.
        self._ends: dict[tuple[str, str], dict[str, int]] = {}

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
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            run_dir.mkdir()
        except FileExistsError:
            return False
        try:
            self._write_atomic(run_dir / "spec.json", dumps(spec))
            self._write_atomic(run_dir / "state.json", dumps(state))
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
        newest = _newest_state(run_dir / STATES)
        return newest if newest is not None else _read_json(run_dir / "state.json")

    async def write_state(self, ws: str, run_id: str, state: JsonObject) -> None:
        """Write ``state`` as a new file ``states/{n}.json``; the highest whole one is the state.

        Creating a file is far cheaper than replacing one (on ext4 a rename over a file also
        writes the new one out), and a reader never sees a torn state: a file still being
        written (or torn by a crash) does not parse and the one before it counts. Like a rename,
        it needs a writable directory and free space, so storage that refuses writes stops the
        commit. Older files are removed now and then, the newest ones kept.
        """
        if self._fsync:
            await self._sync_run(ws, run_id)
        try:
            await self._write_state_file(ws, run_id, state)
        except FileExistsError:
            # Another writer numbered past what this process knew (it took the run over): go on
            # after its states, as a rename would have replaced its state.json.
            self._states.pop((ws, run_id), None)
            await self._write_state_file(ws, run_id, state)

    async def _write_state_file(self, ws: str, run_id: str, state: JsonObject) -> None:
        key = (ws, run_id)
        directory = self._run_dir(ws, run_id) / STATES
        states = self._states.get(key)
        if states is None:
            try:
                numbers = _state_numbers(os.listdir(directory))
            except FileNotFoundError:
                directory.mkdir()
                if self._fsync:
                    _fsync_dir(directory.parent)
                numbers = []
            states = _States(numbers[-1] + 1 if numbers else 1, numbers[0] if numbers else 1)
            self._states[key] = states
        path = directory / _state_name(states.next)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            data = dumps(state)
            written = os.write(fd, data)
            while written < len(data):
                written += os.write(fd, data[written:])
            if self._fsync:  # its content and its name, at once
                await asyncio.gather(
                    asyncio.to_thread(os.fdatasync, fd), asyncio.to_thread(_fsync_dir, directory)
                )
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()  # a full disk must not keep what it could not take
            raise
        finally:
            os.close(fd)
        states.next += 1
        # A paused or finished run writes no more states for now: it keeps only the newest (a
        # reader that listed the directory a moment ago and finds its files gone lists it again).
        kept = FINAL_STATES_KEPT if state.get("state") in _FINAL else STATES_KEPT
        if states.next - states.oldest > (kept if kept == FINAL_STATES_KEPT else 2 * kept):
            for number in range(states.oldest, states.next - kept):
                with contextlib.suppress(OSError):
                    os.unlink(directory / _state_name(number))
            states.oldest = states.next - kept

    async def _sync_run(self, ws: str, run_id: str) -> None:
        """fsync mode: make durable what the run's next state commits (its appended segments, the
        names of its new snapshot blobs), all at once: each in a thread of its own, so the file
        system commits them together instead of one after the other."""
        syncs: list[Callable[[], None]] = []
        for stream in ("events", "transcript"):
            appender = self._appenders.get((ws, run_id, stream))
            if appender is not None and (appender.appended > appender.synced or appender.new_entries):
                # On a duplicate of its descriptor: the run's writer may roll the segment over
                # (and close it) while the sync runs.
                syncs.append(functools.partial(_sync, appender, os.dup(appender.fd)))
        directories = self._unsynced_dirs.pop((ws, run_id), set())
        syncs.extend(functools.partial(_fsync_dir, directory) for directory in directories)
        files = self._unsynced_files.pop((ws, run_id), set())
        syncs.extend(functools.partial(_fsync_file, path) for path in files)
        try:
            if len(syncs) == 1:
                syncs[0]()
            elif syncs:
                await asyncio.gather(*(asyncio.to_thread(sync) for sync in syncs))
        except BaseException:
            if directories:  # the next state write tries them again
                self._unsynced_dirs.setdefault((ws, run_id), set()).update(directories)
            if files:
                self._unsynced_files.setdefault((ws, run_id), set()).update(files)
            raise

    async def commit(self, ws: str, run_id: str, checkpoint: Checkpoint) -> None:
        await commit_in_steps(self, ws, run_id, checkpoint)

    async def write_segment(
        self, ws: str, run_id: str, stream: str, first: int, records: list[JsonObject]
    ) -> None:
        if not records:
            return
        key = (ws, run_id, _stream(stream))
        appender = self._appenders.get(key)
        if appender is None or appender.next != first or appender.next - appender.first >= SEGMENT_RECORDS:
            if appender is not None:
                del self._appenders[key]
                try:
                    _sync(appender)  # fsync mode: what it holds is committed by the next state write
                finally:
                    appender.close()
            directory = self._run_dir(ws, run_id) / key[2]
            new_entries: tuple[Path, ...] = ()
            if not directory.is_dir():
                directory.mkdir(exist_ok=True)
                new_entries = (directory.parent,)
            path = directory / segment_name(first)
            existed = path.exists()
            if self._fsync and not existed:
                new_entries = (directory, *new_entries)
            if existed:
                # Only a retry reopens a segment named ``first``: of a failed append (never append
                # after torn bytes) or of a commit that failed later (never append twice).
                os.truncate(path, 0)
            # Kept open across checkpoints (closed on release/close): appends are cheap, opens are not.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            appender = _Appender(fd, path, first, first, new_entries=new_entries if self._fsync else ())
            self._appenders[key] = appender
        data = dump_lines(records)
        whole = os.fstat(appender.fd).st_size  # the end of the last whole record
        try:
            written = os.write(appender.fd, data)
            while written < len(data):  # a short write: the rest, or the error that stopped it
                written += os.write(appender.fd, data[written:])
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
            appender.appended += 1
        appender.next += sum(doc_span(r) for r in records)

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
        ends[stream] = end
        return end

    async def put_blob(self, ws: str, run_id: str, name: str, data: bytes) -> None:
        directory = self._run_dir(ws, run_id) / "blobs"
        path = directory / check_id(name, "blob name")
        created = not directory.is_dir()
        directory.mkdir(exist_ok=True)
        # A snapshot's blob counts once a state names it: its name is synced with that state
        # (its content is synced before it gets the name, so no name ever holds torn content).
        snapshot = name.startswith(SNAPSHOT_BLOB_PREFIXES)
        if snapshot and _write_new(path, data):
            # Named by its content's digest, never rewritten, and checked against that digest
            # when read back: created in place, without a temporary file and a rename. Only a
            # state written after it names it (in fsync mode, after syncing it with the other
            # files that state commits), so a reader never meets one half-written.
            if self._fsync:
                self._unsynced_files.setdefault((ws, run_id), set()).add(path)
        else:
            self._write_atomic(path, data, sync_dir=not snapshot)
        if snapshot and self._fsync:
            self._unsynced_dirs.setdefault((ws, run_id), set()).update(
                (directory, directory.parent) if created else (directory,)
            )

    async def get_blob(self, ws: str, run_id: str, name: str) -> bytes | None:
        try:
            return (self._run_dir(ws, run_id) / "blobs" / check_id(name, "blob name")).read_bytes()
        except FileNotFoundError:
            return None

    async def put_shared(self, name: str, doc: JsonObject) -> None:
        directory = self._root / "shared"
        directory.mkdir(exist_ok=True)
        self._write_atomic(directory / f"{check_id(name, 'shared name')}.json", dumps(doc))

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
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(dumps(doc))
                if self._fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            if self._fsync:
                _fsync_dir(directory)
        except BaseException:
            path.unlink(missing_ok=True)  # an empty key would block every retry
            raise
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
            self._write_atomic(path, dumps(doc))
            return True
        # Written aside, then linked into place: link fails if the name exists, and readers
        # never see a half-written document.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        self._write_atomic(tmp, dumps(doc))
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
        run_dir = self._run_dir(ws, run_id)
        # Nothing this process remembers of the run outlives it.
        for cache in (
            self._states,
            self._unsynced_dirs,
            self._unsynced_files,
            self._run_dirs,
            self._left,
            self._known_ends,
            self._ends,
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
            # after a power loss every lease has expired anyway. A torn one reads as none.
            fd = os.open(run_dir / "lease.json", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                current = _parse_lease(os.pread(fd, os.fstat(fd).st_size, 0))
                if current and current["owner"] != owner and current["expires_at"] > now:
                    return False
                left = self._left.pop(key, None)
                if left is not None and current is not None and current.get("left") == left[0]:
                    self._known_ends[key] = left[1]  # our own mark: nobody took the run since
                data = dumps({"owner": owner, "expires_at": now + ttl})
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
            finally:
                os.close(fd)
            return True

    async def release_lease(self, ws: str, run_id: str, owner: str) -> None:
        key = (ws, run_id)
        ends = self._ends.pop(key, {})
        self._known_ends.pop(key, None)
        for stream in ("events", "transcript"):
            appender = self._appenders.pop((ws, run_id, stream), None)
            if appender is not None:
                ends[stream] = appender.next - 1
                try:
                    _sync(appender)
                finally:
                    appender.close()
        self._states.pop(key, None)
        run_dir = self._run_dir(ws, run_id)
        with self._locked(run_dir):
            current = _read_lease(run_dir / "lease.json")
            if current and current["owner"] == owner:
                # Expired, with a mark: if it is still there when this process takes the run
                # back, nobody wrote since and the streams end where they are known to.
                mark = secrets.token_hex(8)
                data = dumps({"owner": owner, "expires_at": 0, "left": mark})
                fd = os.open(run_dir / "lease.json", os.O_WRONLY)
                try:
                    os.pwrite(fd, data, 0)
                    os.ftruncate(fd, len(data))
                finally:
                    os.close(fd)
                if len(ends) == 2:
                    if len(self._left) >= _RUN_DIRS_KEPT:
                        self._left.clear()
                    self._left[key] = (mark, ends)

    async def close(self) -> None:
        self._states.clear()
        appenders, self._appenders = list(self._appenders.values()), {}
        for appender in appenders:
            try:
                _sync(appender)
            except OSError:
                pass  # what was not committed is dropped by the run's next writer
            finally:
                appender.close()

    @contextlib.contextmanager
    def _locked(self, run_dir: Path) -> Iterator[None]:
        # flock gives processes sharing the directory an atomic compare-and-set.
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write_atomic(self, path: Path, data: str | bytes, *, sync_dir: bool = True) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data.encode() if isinstance(data, str) else data)
                if self._fsync:
                    fh.flush()
                    os.fdatasync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # a full disk must not keep what it could not take
            raise
        if self._fsync and sync_dir:
            _fsync_dir(path.parent)


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


def _sync(appender: _Appender, fd: int | None = None) -> None:
    """fsync mode: make what was appended to ``appender`` durable, its file's name too.

    ``fd``: a duplicate of its descriptor to sync through, closed here."""
    try:
        appended = appender.appended  # appends made while this one syncs wait for the next
        if appended > appender.synced:
            os.fdatasync(appender.fd if fd is None else fd)
            appender.synced = max(appender.synced, appended)
        entries = appender.new_entries
        for directory in entries:
            _fsync_dir(directory)
        appender.new_entries = appender.new_entries[len(entries) :]
    finally:
        if fd is not None:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


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


def _state_numbers(names: list[str]) -> list[int]:
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def _newest_state(directory: Path) -> JsonObject | None:
    """The highest numbered whole state file in ``directory``; None if there is none."""
    for _ in range(3):
        try:
            numbers = _state_numbers(os.listdir(directory))
        except FileNotFoundError:
            return None
        removed = False
        for number in reversed(numbers):
            try:
                with open(directory / _state_name(number), "rb") as fh:
                    doc: JsonObject = loads(fh.read())
                return doc
            except FileNotFoundError:
                removed = True  # removed as old since the listing: a newer one exists
            except ValueError:
                continue  # still being written, or torn by a crash: the one before counts
        if not removed:
            return None
        # Every file listed was removed meanwhile (a finished run keeps only its newest):
        # list again to find the newer one.
    return None


def _read_lease(path: Path) -> JsonObject | None:
    try:
        return _read_json(path)
    except ValueError:
        return None  # torn by a power loss (it is rewritten in place): no live lease


def _parse_lease(data: bytes) -> JsonObject | None:
    if not data:
        return None
    try:
        doc: JsonObject = loads(data)
        return doc
    except ValueError:
        return None  # torn by a power loss (it is rewritten in place): no live lease


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
