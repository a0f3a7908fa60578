"""The local-directory storage adapter (the layout is described in ``_protocol``), and ``open_storage``."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from engine_service.core._errors import missing_extra
from engine_service.core._ids import check_id
from engine_service.core._types import JsonObject
from engine_service.storage._protocol import Storage, doc_parts, segment_name, segment_starts

SEGMENT_RECORDS = 4096


@dataclass(slots=True)
class _Appender:
    """The open newest segment of one stream of a run this process writes."""

    file: TextIO
    first: int
    next: int


class LocalStorage:
    """Storage in a local directory. Atomic writes by write-to-temp + rename.

    ``fsync`` makes each checkpoint durable against power loss (slower); without
    it writes survive a process crash, which is what kill -9 tests exercise.
    """

    event_flush_delay = 0.0

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self._root = Path(root).resolve()
        self._fsync = fsync
        self._root.mkdir(parents=True, exist_ok=True)
        self._appenders: dict[tuple[str, str, str], _Appender] = {}

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
        try:
            self._write_atomic(run_dir / "spec.json", _dumps(spec))
            self._write_atomic(run_dir / "state.json", _dumps(state))
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
        return _read_json(self._run_dir(ws, run_id) / "state.json")

    async def write_state(self, ws: str, run_id: str, state: JsonObject) -> None:
        self._write_atomic(self._run_dir(ws, run_id) / "state.json", _dumps(state))

    async def write_segment(
        self, ws: str, run_id: str, stream: str, first: int, records: list[JsonObject]
    ) -> None:
        if not records:
            return
        key = (ws, run_id, _stream(stream))
        appender = self._appenders.get(key)
        if appender is None or appender.next != first or appender.next - appender.first >= SEGMENT_RECORDS:
            if appender is not None:
                appender.file.close()
            directory = self._run_dir(ws, run_id) / key[2]
            directory.mkdir(exist_ok=True)
            if (directory / segment_name(first)).exists():
                # Only a retry after a failed append reopens a segment: never append after torn bytes.
                _truncate_after(directory / segment_name(first), 1 << 62)
            # Kept open across checkpoints (closed on release/close): appends are cheap, opens are not.
            handle = open(directory / segment_name(first), "a", encoding="utf-8")  # noqa: SIM115
            appender = _Appender(handle, first, first)
            self._appenders[key] = appender
        path = Path(appender.file.name)
        whole = os.fstat(appender.file.fileno()).st_size  # the end of the last whole record
        try:
            appender.file.write("".join(_dumps(r) + "\n" for r in records))
            appender.file.flush()
            if self._fsync:
                os.fsync(appender.file.fileno())
        except BaseException:
            # A failed append (disk full, I/O error) may have left part of the batch. Cut the
            # segment back to its last whole record so a retry appends after it, never after
            # torn bytes; if even that fails, the retry starts a new segment (see read_segments).
            del self._appenders[key]
            with contextlib.suppress(OSError, ValueError):
                appender.file.close()  # flushing what is buffered may fail again: truncated below
            with contextlib.suppress(OSError):
                os.truncate(path, whole)
            raise
        appender.next += len(records)

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
                for index, line in enumerate(fh, start=first):
                    # A segment ends where the next begins, or at a torn last line (an append
                    # that failed and could not be cut back; its retry began a new segment).
                    if index > end or not line.endswith(b"\n"):
                        break
                    if index > after:
                        out.append(json.loads(line))
        return out

    def _reopen(self, ws: str, run_id: str, stream: str) -> tuple[Path, list[int]]:
        """Forget this process's open segment of ``stream``; its directory and segment starts."""
        key = (ws, run_id, _stream(stream))
        appender = self._appenders.pop(key, None)
        if appender is not None:
            appender.file.close()
        directory = self._run_dir(ws, run_id) / key[2]
        try:
            return directory, segment_starts(os.listdir(directory))
        except FileNotFoundError:
            return directory, []

    async def drop_uncommitted(self, ws: str, run_id: str, stream: str, committed: int) -> None:
        directory, starts = self._reopen(ws, run_id, stream)
        kept = [first for first in starts if first <= committed]
        for first in starts[len(kept) :]:
            (directory / segment_name(first)).unlink(missing_ok=True)
        if kept:
            _truncate_after(directory / segment_name(kept[-1]), committed - kept[-1] + 1)

    async def repair_end(self, ws: str, run_id: str, stream: str) -> int:
        directory, starts = self._reopen(ws, run_id, stream)
        if not starts:
            return 0
        return starts[-1] - 1 + _truncate_after(directory / segment_name(starts[-1]), 1 << 62)

    async def put_blob(self, ws: str, run_id: str, name: str, data: bytes) -> None:
        directory = self._run_dir(ws, run_id) / "blobs"
        path = directory / check_id(name, "blob name")
        directory.mkdir(exist_ok=True)
        self._write_atomic(path, data)

    async def get_blob(self, ws: str, run_id: str, name: str) -> bytes | None:
        try:
            return (self._run_dir(ws, run_id) / "blobs" / check_id(name, "blob name")).read_bytes()
        except FileNotFoundError:
            return None

    async def put_shared(self, name: str, doc: JsonObject) -> None:
        directory = self._root / "shared"
        directory.mkdir(exist_ok=True)
        self._write_atomic(directory / f"{check_id(name, 'shared name')}.json", _dumps(doc))

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
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(_dumps(doc))
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
            self._write_atomic(path, _dumps(doc))
            return True
        # Written aside, then linked into place: link fails if the name exists, and readers
        # never see a half-written document.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        self._write_atomic(tmp, _dumps(doc))
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
        for stream in ("events", "transcript"):
            appender = self._appenders.pop((ws, run_id, stream), None)
            if appender is not None:
                appender.file.close()
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self._run_dir(ws, run_id))

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
        for stream in ("events", "transcript"):
            appender = self._appenders.pop((ws, run_id, stream), None)
            if appender is not None:
                appender.file.close()
        run_dir = self._run_dir(ws, run_id)
        with self._locked(run_dir):
            current = _read_json(run_dir / "lease.json")
            if current and current["owner"] == owner:
                (run_dir / "lease.json").unlink(missing_ok=True)

    async def close(self) -> None:
        for appender in self._appenders.values():
            appender.file.close()
        self._appenders.clear()

    @contextlib.contextmanager
    def _locked(self, run_dir: Path) -> Iterator[None]:
        # flock gives processes sharing the directory an atomic compare-and-set.
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write_atomic(self, path: Path, data: str | bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data.encode() if isinstance(data, str) else data)
                if self._fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # a full disk must not keep what it could not take
            raise
        if self._fsync:
            _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _truncate_after(path: Path, keep: int) -> int:
    """Keep the first ``keep`` complete lines of ``path`` (drops a torn or uncommitted tail).

    Returns how many lines were kept.
    """
    size = kept = 0
    with open(path, "rb") as fh:
        for line in fh:
            if kept >= keep or not line.endswith(b"\n"):
                break
            size += len(line)
            kept += 1
    if os.path.getsize(path) != size:
        os.truncate(path, size)
    return kept


def _stream(name: str) -> str:
    if name not in ("events", "transcript"):
        raise ValueError(f"unknown stream {name!r}")
    return name


# One encoder for every record: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _dumps(doc: Any) -> str:
    return _encode(doc)


def _read_json(path: Path) -> JsonObject | None:
    try:
        with open(path, encoding="utf-8") as fh:
            doc: JsonObject = json.load(fh)
            return doc
    except FileNotFoundError:
        return None


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
