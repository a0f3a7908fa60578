"""Storage: one adapter protocol, and the local-directory adapter.

Layout under the root (the same for every adapter)::

    workspaces/{workspace_id}/runs/{run_id}/spec.json        written once
    workspaces/{workspace_id}/runs/{run_id}/state.json       status + checkpoint, atomic
    workspaces/{workspace_id}/runs/{run_id}/events/{first:012d}-{last:012d}.jsonl
    workspaces/{workspace_id}/runs/{run_id}/transcript/{first:012d}-{last:012d}.jsonl
    workspaces/{workspace_id}/runs/{run_id}/lease.json       one writer at a time
    workspaces/{workspace_id}/requests/{request_id}.json     idempotency keys

Segments are immutable files written once per checkpoint (an object store has
no append), so a checkpoint costs the same at turn 1 and turn 1,000. A segment
only counts once ``state.json`` says so: ``state.last_seq`` / ``transcript_len``
are the commit point, and a segment written by a writer that died before it
committed is ignored and overwritten by the next writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine_service._ids import check_id
from engine_service._types import JsonObject

_SEGMENT_DIGITS = 12


@dataclass(frozen=True, slots=True)
class Lease:
    owner: str
    expires_at: float


class Storage(Protocol):
    """What the engine needs from storage. All ids are validated by the caller."""

    async def create_run(self, ws: str, run_id: str, spec: JsonObject, state: JsonObject) -> bool:
        """Write spec.json and state.json unless the run exists; False if it did."""
        ...

    async def read_spec(self, ws: str, run_id: str) -> JsonObject | None: ...

    async def read_state(self, ws: str, run_id: str) -> JsonObject | None: ...

    async def write_state(self, ws: str, run_id: str, state: JsonObject) -> None:
        """Atomically replace state.json (readers see the old or the new document)."""
        ...

    async def write_segment(
        self, ws: str, run_id: str, stream: str, first: int, records: list[JsonObject]
    ) -> None:
        """Write records ``first..first+len-1`` of ``stream`` (events|transcript) as one segment."""
        ...

    async def read_segments(
        self, ws: str, run_id: str, stream: str, after: int, upto: int
    ) -> list[JsonObject]:
        """Records with index in ``(after, upto]`` (1-based), in order."""
        ...

    async def drop_uncommitted(self, ws: str, run_id: str, stream: str, committed: int) -> None:
        """Delete segments starting after ``committed`` (left by a writer that died)."""
        ...

    async def list_runs(self, ws: str) -> list[str]: ...

    async def put_if_absent(self, ws: str, key: str, doc: JsonObject) -> JsonObject | None:
        """Store ``doc`` under workspace key ``key`` unless present; return the existing one if it was."""
        ...

    async def acquire_lease(self, ws: str, run_id: str, owner: str, ttl: float) -> bool:
        """Take or renew the run's lease for ``owner``; False if another owner holds a live one."""
        ...

    async def release_lease(self, ws: str, run_id: str, owner: str) -> None: ...

    async def close(self) -> None: ...


def segment_name(first: int, last: int) -> str:
    return f"{first:0{_SEGMENT_DIGITS}d}-{last:0{_SEGMENT_DIGITS}d}.jsonl"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    stem, dot, ext = name.partition(".")
    first, dash, last = stem.partition("-")
    if not (dot and dash and ext == "jsonl" and first.isdigit() and last.isdigit()):
        return None
    return int(first), int(last)


def pick_segments(names: list[str], after: int, upto: int) -> list[tuple[int, int, str]]:
    """The chain of segments covering ``(after, upto]``, in order.

    Writers delete uncommitted segments when they take a run over
    (``drop_uncommitted``), so each committed start has one segment.
    """
    by_first: dict[int, tuple[int, str]] = {}
    for name in names:
        span = parse_segment_name(name)
        if span is not None and span[0] <= upto:
            by_first[span[0]] = (span[1], name)
    chosen: list[tuple[int, int, str]] = []
    cursor = after + 1
    for first in sorted(by_first):
        last, name = by_first[first]
        if last < cursor:
            continue
        if first > cursor:
            break
        chosen.append((first, last, name))
        cursor = last + 1
        if cursor > upto:
            break
    return chosen


class LocalStorage:
    """Storage in a local directory. Atomic writes by write-to-temp + rename.

    ``fsync`` makes each checkpoint durable against power loss (slower); without
    it writes survive a process crash, which is what kill -9 tests exercise.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self._root = Path(root).resolve()
        self._fsync = fsync
        self._root.mkdir(parents=True, exist_ok=True)

    @property
    def root(self) -> Path:
        return self._root

    def _run_dir(self, ws: str, run_id: str) -> Path:
        return self._root / "workspaces" / check_id(ws, "workspace_id") / "runs" / check_id(run_id, "run_id")

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
        self._write_atomic(run_dir / "spec.json", _dumps(spec))
        self._write_atomic(run_dir / "state.json", _dumps(state))
        return True

    async def read_spec(self, ws: str, run_id: str) -> JsonObject | None:
        return _read_json(self._run_dir(ws, run_id) / "spec.json")

    async def read_state(self, ws: str, run_id: str) -> JsonObject | None:
        return _read_json(self._run_dir(ws, run_id) / "state.json")

    async def write_state(self, ws: str, run_id: str, state: JsonObject) -> None:
        self._write_atomic(self._run_dir(ws, run_id) / "state.json", _dumps(state))

    async def write_segment(
        self, ws: str, run_id: str, stream: str, first: int, records: list[JsonObject]
    ) -> None:
        if not records:
            return
        directory = self._run_dir(ws, run_id) / _stream(stream)
        directory.mkdir(exist_ok=True)
        body = "".join(_dumps(r) + "\n" for r in records)
        self._write_atomic(directory / segment_name(first, first + len(records) - 1), body)

    async def read_segments(
        self, ws: str, run_id: str, stream: str, after: int, upto: int
    ) -> list[JsonObject]:
        if upto <= after:
            return []
        directory = self._run_dir(ws, run_id) / _stream(stream)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        out: list[JsonObject] = []
        for first, _last, name in pick_segments(names, after, upto):
            with open(directory / name, encoding="utf-8") as fh:
                for index, line in enumerate(fh, start=first):
                    if index > upto:
                        break
                    if index > after:
                        out.append(json.loads(line))
        return out

    async def drop_uncommitted(self, ws: str, run_id: str, stream: str, committed: int) -> None:
        directory = self._run_dir(ws, run_id) / _stream(stream)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return
        for name in names:
            span = parse_segment_name(name)
            if span is not None and span[0] > committed:
                (directory / name).unlink(missing_ok=True)

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
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(_dumps(doc))
        return None

    async def acquire_lease(self, ws: str, run_id: str, owner: str, ttl: float) -> bool:
        run_dir = self._run_dir(ws, run_id)
        now = time.time()
        with self._locked(run_dir):
            current = _read_json(run_dir / "lease.json")
            if current and current["owner"] != owner and current["expires_at"] > now:
                return False
            self._write_atomic(run_dir / "lease.json", _dumps({"owner": owner, "expires_at": now + ttl}))
            return True

    async def release_lease(self, ws: str, run_id: str, owner: str) -> None:
        run_dir = self._run_dir(ws, run_id)
        with self._locked(run_dir):
            current = _read_json(run_dir / "lease.json")
            if current and current["owner"] == owner:
                (run_dir / "lease.json").unlink(missing_ok=True)

    async def close(self) -> None:
        return None

    @contextlib.contextmanager
    def _locked(self, run_dir: Path) -> Iterator[None]:
        # flock gives processes sharing the directory an atomic compare-and-set.
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write_atomic(self, path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            if self._fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if self._fsync:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def _stream(name: str) -> str:
    if name not in ("events", "transcript"):
        raise ValueError(f"unknown stream {name!r}")
    return name


def _dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def _read_json(path: Path) -> JsonObject | None:
    try:
        with open(path, encoding="utf-8") as fh:
            doc: JsonObject = json.load(fh)
            return doc
    except FileNotFoundError:
        return None


def open_storage(url: str, *, fsync: bool = False) -> Storage:
    """Storage from a URL: ``file:///abs/dir`` or a plain path."""
    if url.startswith("file://"):
        return LocalStorage(url.removeprefix("file://"), fsync=fsync)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ValueError(f"unsupported storage URL scheme {scheme!r}: use file:///abs/dir or a path")
    return LocalStorage(url, fsync=fsync)
