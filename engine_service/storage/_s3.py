"""The S3-compatible storage adapter (AWS S3, Cloudflare R2, MinIO) on aioboto3.

Same layout and guarantees as the local adapter (see _protocol.py), with the
object store's own tools: every object is written whole (no torn state.json);
segments are immutable objects named ``{first}-{last}.jsonl``, so nothing
rewrites the history; creation, idempotency keys and the run lease use
conditional writes (``If-None-Match: *`` / ``If-Match``). 5xx, throttling,
timeouts and dropped connections are retried by botocore with exponential
backoff and jitter; a conditional write whose first attempt landed but whose
answer was lost is recognised on the retry by reading back.

A checkpoint is one request: ``commit`` replaces ``state.json`` with the state
document plus, under ``"log"``, the events and transcript entries committed
since the log was last moved out (the *tail*). Once a checkpoint's tail passes
``TAIL_BYTES``, its records are written out as ordinary segments in the
background (in parallel, while the run goes on), and the first checkpoint after
those writes landed leaves them out of its tail, so ``state.json`` stays small
and a checkpoint costs the same at turn 1 and turn 1,000. (A pause or an end
moves nothing out: the run's next writer does.) Readers take the tail into
account (``read_segments``, ``repair_end``); a ``state.json`` without one (and
segments of one per checkpoint, as written before) reads as it always did.
The replacement is conditional on the ``state.json`` this process last read
or wrote (``If-Match``): a writer whose lease went stale, and whom another has
overtaken since, gets `StateConflict` instead of overwriting the newer state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from engine_service.core._ids import check_id
from engine_service.core._types import JsonObject
from engine_service.storage._protocol import (
    Checkpoint,
    StateConflict,
    StorageCredentialsMissing,
    StorageUnavailable,
    doc_parts,
)
from engine_service.storage._records import doc_span, dump_lines, dumps, loads, span

_DIGITS = 12
# The key of state.json that holds the tail of the log (see the module docstring).
TAIL_KEY = "log"
# Past this many bytes of tail, a checkpoint first moves the tail out to segments.
TAIL_BYTES = 32 * 1024
# Runs whose state.json version (and tail) a process remembers.
_HEADS = 4096
# Segments read at once.
_READ_AHEAD = 16
# A state.json of one of these moves no tail out (the run writes no more for now).
_FINAL = frozenset({"PAUSED", "DONE", "FAILED", "CANCELLED"})


@dataclass(slots=True)
class _Tail:
    """A run's log in its state.json: events (each with its seq) and transcript entries."""

    events: list[JsonObject] = field(default_factory=list)
    transcript_first: int = 0
    transcript: list[JsonObject] = field(default_factory=list)
    size: int = 0  # of the state.json that holds it

    @classmethod
    def from_json(cls, doc: Any) -> _Tail:
        if not isinstance(doc, dict):
            return cls()
        events = [e for e in doc.get("events") or [] if isinstance(e, dict) and isinstance(e.get("seq"), int)]
        transcript = [t for t in doc.get("transcript") or [] if isinstance(t, dict)]
        first = doc.get("transcript_first")
        return cls(events, first if isinstance(first, int) and first > 0 else 0, transcript)

    def to_json(self, writer: str) -> JsonObject:
        return {
            "writer": writer,
            "events": self.events,
            "transcript_first": self.transcript_first,
            "transcript": self.transcript,
        }

    def records(self, stream: str) -> list[tuple[int, int, JsonObject]]:
        """(first, last, record) of each record of ``stream`` the tail holds, in order."""
        if stream == "events":
            return [(e["seq"], e["seq"] + doc_span(e) - 1, e) for e in self.events]
        first = self.transcript_first
        return [(first + i, first + i, t) for i, t in enumerate(self.transcript)] if first else []


@dataclass(slots=True)
class _Head:
    """What this process last read or wrote of a run's state.json."""

    etag: str
    tail: _Tail
    # When it was taken (a counter): a read that started before a later write does not replace it.
    stamp: int = 0
    writer: str = ""  # the process that wrote it (its log's "writer")


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _precondition_failed(error: ClientError) -> bool:
    return _status(error) == 412 or _code(error) in ("PreconditionFailed", "ConditionalRequestConflict")


def _missing(error: ClientError) -> bool:
    return _status(error) == 404 or _code(error) in ("NoSuchKey", "404", "NotFound")


_THROTTLED = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"}
)


@contextlib.contextmanager
def _faults() -> Iterator[None]:
    """What botocore's own retries could not get through becomes StorageUnavailable."""
    try:
        yield
    except ClientError as error:
        if _status(error) >= 500 or _code(error) in _THROTTLED:
            raise StorageUnavailable(f"the object store answered {_status(error)} {_code(error)}") from None
        raise
    except NoCredentialsError:
        raise StorageCredentialsMissing(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        ) from None
    except BotoCoreError as error:
        raise StorageUnavailable(f"the object store is unreachable ({type(error).__name__})") from None


class S3Storage:
    """Storage in ``s3://bucket/prefix``. Keys are built only from validated ids."""

    # A streaming model turn writes its events ahead every 50 ms, not one PUT per token.
    event_flush_delay = 0.05

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 10,
        timeout_s: float = 10.0,
    ) -> None:
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self._region = (
            region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
        # The standard AWS variable, when set, says how hard botocore tries before a fault
        # reaches the engine (which then waits for storage itself, see RunActor.checkpoint).
        max_attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or max_attempts)
        self._config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
        )
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._heads: OrderedDict[tuple[str, str], _Head] = OrderedDict()
        self._stamps = itertools.count(1)
        self._leases: dict[tuple[str, str], tuple[str, str]] = {}  # (owner, etag) of leases we wrote
        # Runs created here that no one has leased yet, and runs whose first lease we took: for
        # those, taking the lease and finding the log's end need no reads.
        self._new: set[tuple[str, str]] = set()
        self._unwritten: set[tuple[str, str]] = set()
        # Written in each state.json this process writes: a write of ours that landed although
        # its request failed is recognised as ours, not taken for another writer's.
        self._writer = uuid.uuid4().hex
        # Tails being written out as segments in the background, by run (see the docstring).
        self._moving: dict[tuple[str, str], tuple[asyncio.Task[None], _Tail]] = {}

    async def _s3(self) -> Any:
        if self._client is None:
            session = aioboto3.Session()
            self._client = await self._stack.enter_async_context(
                session.client(
                    "s3", endpoint_url=self._endpoint, region_name=self._region, config=self._config
                )
            )
        return self._client

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self._prefix, *parts) if p)

    def _run(self, ws: str, run_id: str, *rest: str) -> str:
        return self._key(
            "workspaces", check_id(ws, "workspace_id"), "runs", check_id(run_id, "run_id"), *rest
        )

    # -- object helpers ------------------------------------------------------------------

    async def _get(self, key: str) -> tuple[bytes, str] | None:
        s3 = await self._s3()
        with _faults():
            try:
                response = await s3.get_object(Bucket=self._bucket, Key=key)
                async with response["Body"] as body:
                    data: bytes = await body.read()
                return data, str(response.get("ETag", ""))
            except ClientError as error:
                if _missing(error):
                    return None
                raise

    async def _get_json(self, key: str) -> JsonObject | None:
        found = await self._get(key)
        if found is None:
            return None
        doc: JsonObject = loads(found[0])
        return doc

    async def _put(self, key: str, data: bytes, **conditions: str) -> str | None:
        """Put ``data``; with a condition, None when it failed (412)."""
        s3 = await self._s3()
        with _faults():
            try:
                response = await s3.put_object(Bucket=self._bucket, Key=key, Body=data, **conditions)
            except ClientError as error:
                if conditions and _precondition_failed(error):
                    return None
                raise
        return str(response.get("ETag", ""))

    async def _put_new(self, key: str, data: bytes) -> bool:
        """Create ``key`` unless it exists. A retried create that already landed counts as ours."""
        if await self._put(key, data, IfNoneMatch="*") is not None:
            return True
        existing = await self._get(key)
        return existing is not None and existing[0] == data

    async def _list(self, prefix: str, delimiter: str = "") -> tuple[list[str], list[str]]:
        s3 = await self._s3()
        keys: list[str] = []
        prefixes: list[str] = []
        paginator = s3.get_paginator("list_objects_v2")
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        with _faults():
            async for page in paginator.paginate(**kwargs):
                keys += [item["Key"] for item in page.get("Contents", ())]
                prefixes += [item["Prefix"] for item in page.get("CommonPrefixes", ())]
        return keys, prefixes

    # -- the Storage protocol --------------------------------------------------------------

    async def create_run(self, ws: str, run_id: str, spec: JsonObject, state: JsonObject) -> bool:
        if not await self._put_new(self._run(ws, run_id, "spec.json"), dumps(spec)):
            return False
        body = dumps({**state, TAIL_KEY: _Tail().to_json(self._writer)})
        etag = await self._put(self._run(ws, run_id, "state.json"), body, IfNoneMatch="*")
        if etag is not None:
            self._remember(ws, run_id, _Head(etag, _Tail(size=len(body)), next(self._stamps), self._writer))
            self._new.add((ws, run_id))
            return True
        existing = await self._get(self._run(ws, run_id, "state.json"))  # a retried create that landed
        return existing is not None and existing[0] == body

    async def read_spec(self, ws: str, run_id: str) -> JsonObject | None:
        return await self._get_json(self._run(ws, run_id, "spec.json"))

    async def read_state(self, ws: str, run_id: str) -> JsonObject | None:
        found = await self._read_head(ws, run_id)
        return None if found is None else found[0]

    async def _read_head(self, ws: str, run_id: str) -> tuple[JsonObject, _Head] | None:
        stamp = next(self._stamps)
        found = await self._get(self._run(ws, run_id, "state.json"))
        if found is None:
            return None
        doc: JsonObject = loads(found[0])
        log = doc.pop(TAIL_KEY, None)
        tail = _Tail.from_json(log)
        tail.size = len(found[0])
        writer = log.get("writer") if isinstance(log, dict) else None
        head = _Head(found[1], tail, stamp, writer if isinstance(writer, str) else "")
        self._remember(ws, run_id, head)
        return doc, head

    def _remember(self, ws: str, run_id: str, head: _Head) -> None:
        known = self._heads.get((ws, run_id))
        if known is not None and known.stamp > head.stamp:
            return  # read before a write of ours that landed since: older than what we know
        self._heads[(ws, run_id)] = head
        self._heads.move_to_end((ws, run_id))
        while len(self._heads) > _HEADS:
            self._heads.popitem(last=False)

    async def write_state(self, ws: str, run_id: str, state: JsonObject) -> None:
        await self.commit(ws, run_id, Checkpoint(state))

    async def commit(self, ws: str, run_id: str, checkpoint: Checkpoint) -> None:
        """One PUT of state.json with the checkpoint's events and transcript entries in its
        tail (after the checkpoint's blobs, in parallel); see the module docstring.

        Raises `StateConflict` when state.json is no longer what this process last read or
        wrote (another writer replaced it meanwhile).
        """
        key = self._run(ws, run_id, "state.json")
        head = self._heads.get((ws, run_id))
        if head is None:
            found = await self._read_head(ws, run_id)
            head = found[1] if found is not None else _Head("", _Tail())
        if checkpoint.blobs:
            await asyncio.gather(*(self.put_blob(ws, run_id, n, d) for n, d in checkpoint.blobs.items()))
        for attempt in range(3):
            base = self._moved_out(ws, run_id, head.tail)
            tail = _extended(base, checkpoint)
            if tail is None:
                if attempt:
                    first = checkpoint.transcript_first
                    raise ValueError(f"run {run_id}: transcript entries from {first} do not follow the tail")
                found = await self._read_head(ws, run_id)  # what we knew was stale: look again
                head = found[1] if found is not None else _Head("", _Tail())
                continue
            body = dumps({**checkpoint.state, TAIL_KEY: tail.to_json(self._writer)})
            tail.size = len(body)
            conditions = {"IfMatch": head.etag} if head.etag else {"IfNoneMatch": "*"}
            etag = await self._put(key, body, **conditions)
            if etag is not None:
                self._remember(ws, run_id, _Head(etag, tail, next(self._stamps), self._writer))
                if tail.size > TAIL_BYTES and checkpoint.state.get("state") not in _FINAL:
                    self._start_move(ws, run_id, tail)
                return
            # Lost a race, or a write of ours landed without our learning it: read back.
            found = await self._read_head(ws, run_id)
            if found is None or found[1].writer != self._writer:
                self._heads.pop((ws, run_id), None)
                raise StateConflict(f"the state of run {run_id} was replaced by another writer")
            head = found[1]  # ours after all (e.g. an attempt that failed late): build on it
        raise StateConflict(f"the state of run {run_id} keeps changing under this writer")

    def _start_move(self, ws: str, run_id: str, tail: _Tail) -> None:
        key = (ws, run_id)
        if key in self._moving:
            return
        if len(self._moving) >= _HEADS:
            # Runs that stopped committing here (moved away, lease lost): their tails keep the
            # records, so forgetting a finished move only costs the next writer a move of its own.
            for other, (task, _) in list(self._moving.items()):
                if task.done():
                    del self._moving[other]
                    if not task.cancelled():
                        task.exception()  # retrieved: a failed move is not an error to report
        self._moving[key] = (asyncio.create_task(self._move_out(ws, run_id, tail)), tail)

    def _moved_out(self, ws: str, run_id: str, tail: _Tail) -> _Tail:
        """``tail`` without the records a background move has written out as segments (as it
        is while that move is under way, or failed)."""
        moving = self._moving.get((ws, run_id))
        if moving is None or not moving[0].done():
            return tail
        task, moved = self._moving.pop((ws, run_id))
        if task.cancelled() or task.exception() is not None:
            return tail  # the tail keeps them; a later checkpoint moves them out again
        if not (_starts_with(tail.events, moved.events) and _starts_with(tail.transcript, moved.transcript)):
            return tail  # not the tail it was moved from (read again since): keep it whole
        out = _Tail(tail.events[len(moved.events) :])
        rest = tail.transcript[len(moved.transcript) :]
        if rest:
            out.transcript_first = tail.transcript_first + len(moved.transcript)
            out.transcript = rest
        return out

    async def _settle_moves(self, ws: str, run_id: str) -> None:
        """Wait for the run's background move (its segments must not land after a deletion)."""
        moving = self._moving.pop((ws, run_id), None)
        if moving is not None:
            with contextlib.suppress(Exception):
                await moving[0]

    async def _move_out(self, ws: str, run_id: str, tail: _Tail) -> None:
        """Write ``tail``'s records as segments (state.json still holds them until replaced)."""
        writes = []
        run: list[JsonObject] = []
        for record in tail.events:  # one segment per run of consecutive seqs
            if run and run[-1]["seq"] + doc_span(run[-1]) != record["seq"]:
                writes.append(self.write_segment(ws, run_id, "events", run[0]["seq"], run))
                run = []
            run.append(record)
        if run:
            writes.append(self.write_segment(ws, run_id, "events", run[0]["seq"], run))
        if tail.transcript:
            writes.append(
                self.write_segment(ws, run_id, "transcript", tail.transcript_first, tail.transcript)
            )
        await asyncio.gather(*writes)

    async def _tail(self, ws: str, run_id: str) -> _Tail:
        found = await self._read_head(ws, run_id)
        return found[1].tail if found is not None else _Tail()

    async def write_segment(
        self, ws: str, run_id: str, stream: str, first: int, records: list[JsonObject]
    ) -> None:
        if not records:
            return
        last = first + sum(doc_span(r) for r in records) - 1
        name = f"{first:0{_DIGITS}d}-{last:0{_DIGITS}d}.jsonl"
        body = dump_lines(records)
        await self._put(self._run(ws, run_id, _stream(stream), name), body)

    async def _segments(self, ws: str, run_id: str, stream: str) -> list[tuple[int, int, str]]:
        keys, _ = await self._list(self._run(ws, run_id, _stream(stream)) + "/")
        spans = []
        for key in keys:
            stem = key.rsplit("/", 1)[-1].removesuffix(".jsonl")
            first, _, last = stem.partition("-")
            if first.isdigit() and last.isdigit():
                spans.append((int(first), int(last), key))
        return sorted(spans)

    async def read_segments(
        self, ws: str, run_id: str, stream: str, after: int, upto: int
    ) -> list[JsonObject]:
        if upto <= after:
            return []
        cached = self._heads.get((ws, run_id))
        if cached is not None:
            # Committed records never change: what the tail last seen here holds is served as is.
            held = [(f, last, r) for f, last, r in cached.tail.records(stream) if last > after and f <= upto]
            if held and held[0][0] <= after + 1 and held[-1][1] >= upto and _contiguous(held):
                return [record for _, _, record in held]
        segments = [(first, last, key) for first, last, key in await self._segments(ws, run_id, stream)
                    if last > after and first <= upto]  # fmt: skip
        # state.json's tail is read only when the segments leave a gap (or stop short).
        cursor = after + 1
        for first, last, _ in segments:
            if first > cursor:
                break
            cursor = max(cursor, last + 1)
        tail = await self._tail(ws, run_id) if cursor <= upto else _Tail()
        bodies = await self._get_all([key for _, _, key in segments])
        sources: list[tuple[int, int, list[tuple[int, Any]]]] = []
        for (first, last, _), body in zip(segments, bodies, strict=True):
            if body is not None:
                sources.append((first, last, _lines(first, body)))
        sources += [(first, last, [(first, record)]) for first, last, record in tail.records(stream)
                    if last > after and first <= upto]  # fmt: skip
        sources.sort(key=lambda source: (source[0], -source[1]))
        out: list[JsonObject] = []
        cursor = after + 1
        for first, last, items in sources:
            if last < cursor:
                continue  # behind us (a segment and the tail may both hold a record)
            if first > cursor:
                break  # a gap: nothing committed lies past it
            for index, item in items:
                if index + _span_of(item) - 1 >= cursor and index <= upto:
                    out.append(item if isinstance(item, dict) else loads(item))
            cursor = last + 1
            if cursor > upto:
                break
        return out

    async def _get_all(self, keys: list[str]) -> list[bytes | None]:
        """The bodies of ``keys`` (None where missing), a few requests at a time."""
        out: list[bytes | None] = []
        for start in range(0, len(keys), _READ_AHEAD):
            found = await asyncio.gather(*(self._get(key) for key in keys[start : start + _READ_AHEAD]))
            out += [None if f is None else f[0] for f in found]
        return out

    async def drop_uncommitted(self, ws: str, run_id: str, stream: str, committed: int) -> None:
        # A segment is committed whole or not at all: state.json moves to its last record.
        # (The tail in state.json is committed by definition.)
        head = self._heads.get((ws, run_id))
        if stream == "transcript" and head is not None and head.writer:
            # The state (just read by the writer taking the run over) was written with a tail:
            # transcript segments hold only committed entries since (an earlier version's
            # leftovers were dropped when that writer took over).
            return
        stale = [key for first, last, key in await self._segments(ws, run_id, stream)
                 if first > committed or last > committed]  # fmt: skip
        if stale:
            await self._delete(*stale)

    async def repair_end(self, ws: str, run_id: str, stream: str) -> int:
        # Segments are written whole or not at all: nothing is ever torn. The caller, the writer
        # taking the run over, has just read state.json: its tail is the one this process knows.
        head = self._heads.get((ws, run_id))
        if head is not None and (ws, run_id) in self._unwritten:
            # Its first lease is ours: no writer wrote ahead of a state before us.
            self._unwritten.discard((ws, run_id))
            return max((last for _, last, _ in head.tail.records(stream)), default=0)
        if head is None:
            segments, tail = await asyncio.gather(self._segments(ws, run_id, stream), self._tail(ws, run_id))
        else:
            segments, tail = await self._segments(ws, run_id, stream), head.tail
        ends = [last for _, last, _ in segments] + [last for _, last, _ in tail.records(stream)]
        return max(ends, default=0)

    async def put_blob(self, ws: str, run_id: str, name: str, data: bytes) -> None:
        await self._put(self._run(ws, run_id, "blobs", check_id(name, "blob name")), data)

    async def get_blob(self, ws: str, run_id: str, name: str) -> bytes | None:
        found = await self._get(self._run(ws, run_id, "blobs", check_id(name, "blob name")))
        return None if found is None else found[0]

    async def put_shared(self, name: str, doc: JsonObject) -> None:
        await self._put(self._key("shared", f"{check_id(name, 'shared name')}.json"), dumps(doc))

    async def get_shared(self, name: str) -> JsonObject | None:
        return await self._get_json(self._key("shared", f"{check_id(name, 'shared name')}.json"))

    async def list_runs(self, ws: str) -> list[str]:
        base = self._key("workspaces", check_id(ws, "workspace_id"), "runs") + "/"
        _, prefixes = await self._list(base, delimiter="/")
        return [p[len(base) :].rstrip("/") for p in prefixes]

    async def list_workspaces(self) -> list[str]:
        base = self._key("workspaces") + "/"
        _, prefixes = await self._list(base, delimiter="/")
        return [p[len(base) :].rstrip("/") for p in prefixes]

    async def put_if_absent(self, ws: str, key: str, doc: JsonObject) -> JsonObject | None:
        path = self._key(
            "workspaces", check_id(ws, "workspace_id"), "requests", f"{check_id(key, 'request_id')}.json"
        )
        if await self._put_new(path, dumps(doc)):
            return None
        return await self._get_json(path)

    async def delete_request_key(self, ws: str, key: str) -> None:
        await self._delete(
            self._key(
                "workspaces", check_id(ws, "workspace_id"), "requests", f"{check_id(key, 'request_id')}.json"
            )
        )

    def _doc(self, ws: str, key: str) -> str:
        *folders, name = doc_parts(key)
        return self._key("workspaces", check_id(ws, "workspace_id"), "docs", *folders, f"{name}.json")

    async def _delete(self, *keys: str) -> None:
        s3 = await self._s3()
        with _faults():
            for start in range(0, len(keys), 1000):
                batch = [{"Key": key} for key in keys[start : start + 1000]]
                if len(batch) == 1:
                    await s3.delete_object(Bucket=self._bucket, Key=batch[0]["Key"])
                else:
                    await s3.delete_objects(Bucket=self._bucket, Delete={"Objects": batch, "Quiet": True})

    async def put_doc(self, ws: str, key: str, doc: JsonObject, *, create_only: bool = False) -> bool:
        path = self._doc(ws, key)
        if create_only:
            return await self._put_new(path, dumps(doc))
        await self._put(path, dumps(doc))
        return True

    async def get_doc(self, ws: str, key: str) -> JsonObject | None:
        return await self._get_json(self._doc(ws, key))

    async def list_docs(self, ws: str, prefix: str) -> list[str]:
        base = self._key("workspaces", check_id(ws, "workspace_id"), "docs") + "/"
        keys, _ = await self._list(base + "/".join(doc_parts(prefix)) + "/")
        return sorted(k[len(base) :].removesuffix(".json") for k in keys if k.endswith(".json"))

    async def delete_doc(self, ws: str, key: str) -> None:
        await self._delete(self._doc(ws, key))

    async def delete_run(self, ws: str, run_id: str) -> None:
        await self._settle_moves(ws, run_id)
        self._heads.pop((ws, run_id), None)
        self._leases.pop((ws, run_id), None)
        self._new.discard((ws, run_id))
        self._unwritten.discard((ws, run_id))
        keys, _ = await self._list(self._run(ws, run_id) + "/")
        if keys:
            await self._delete(*keys)

    async def acquire_lease(self, ws: str, run_id: str, owner: str, ttl: float) -> bool:
        key = self._run(ws, run_id, "lease.json")
        doc = dumps({"owner": owner, "expires_at": time.time() + ttl})
        if await self._rewrite_own_lease(key, ws, run_id, owner, doc):
            return True
        self._leases.pop((ws, run_id), None)
        self._unwritten.discard((ws, run_id))
        if (ws, run_id) in self._new:
            # Created here and never leased: no lease to read first (and no writer before us).
            self._new.discard((ws, run_id))
            etag = await self._put(key, doc, IfNoneMatch="*")
            if etag is not None:
                self._leases[(ws, run_id)] = (owner, etag)
                self._unwritten.add((ws, run_id))
                return True
        current = await self._get(key)
        if current is None:
            etag = await self._put(key, doc, IfNoneMatch="*")
        else:
            held = loads(current[0])
            if held["owner"] != owner and held["expires_at"] > time.time():
                return False
            etag = await self._put(key, doc, IfMatch=current[1])
        if etag is not None:
            self._leases[(ws, run_id)] = (owner, etag)
            return True
        # Lost a race, or our own write landed but its answer did not: read back.
        latest = await self._get(key)
        if latest is None or loads(latest[0]).get("owner") != owner:
            return False
        self._leases[(ws, run_id)] = (owner, latest[1])
        return True

    async def renew_lease(self, ws: str, run_id: str, owner: str, ttl: float) -> bool:
        key = self._run(ws, run_id, "lease.json")
        doc = dumps({"owner": owner, "expires_at": time.time() + ttl})
        if await self._rewrite_own_lease(key, ws, run_id, owner, doc):
            return True
        # Not the lease this process wrote last: someone else wrote it since, or our own
        # write landed but its answer did not. Only the latter (ours, not released) is extended.
        self._leases.pop((ws, run_id), None)
        current = await self._get(key)
        if current is None:
            return False
        held = loads(current[0])
        if held.get("owner") != owner or held.get("expires_at", 0) <= 0:
            return False
        etag = await self._put(key, doc, IfMatch=current[1])
        if etag is None:
            return False
        self._leases[(ws, run_id)] = (owner, etag)
        return True

    async def _rewrite_own_lease(self, key: str, ws: str, run_id: str, owner: str, doc: bytes) -> bool:
        """Renew a lease this process wrote last: one conditional PUT, no read first. False if
        this process did not write it last, or someone else wrote it since."""
        mine = self._leases.get((ws, run_id))
        if mine is None or mine[0] != owner:
            return False
        etag = await self._put(key, doc, IfMatch=mine[1])
        if etag is None:
            return False
        self._leases[(ws, run_id)] = (owner, etag)
        return True

    async def release_lease(self, ws: str, run_id: str, owner: str) -> None:
        key = self._run(ws, run_id, "lease.json")
        # Expire rather than delete: If-Match keeps us from clobbering a new owner.
        expired = dumps({"owner": owner, "expires_at": 0})
        self._unwritten.discard((ws, run_id))
        mine = self._leases.pop((ws, run_id), None)
        if (
            mine is not None
            and mine[0] == owner
            and await self._put(key, expired, IfMatch=mine[1]) is not None
        ):
            return
        current = await self._get(key)
        if current is not None and loads(current[0]).get("owner") == owner:
            await self._put(key, expired, IfMatch=current[1])

    async def close(self) -> None:
        # The tails being moved out are still in their state.json: what is left unwritten is not lost.
        for task, _ in self._moving.values():
            task.cancel()
        await asyncio.gather(*(task for task, _ in self._moving.values()), return_exceptions=True)
        self._moving.clear()
        await self._stack.aclose()
        self._client = None


def _extended(tail: _Tail, checkpoint: Checkpoint) -> _Tail | None:
    """``tail`` with the checkpoint's events and transcript entries (a retried commit brings
    some again: they replace what the tail has); None if the entries do not follow the tail's."""
    out = _Tail(list(tail.events), tail.transcript_first, list(tail.transcript), tail.size)
    if checkpoint.events:
        seq = checkpoint.events[0]["seq"]
        out.events = [e for e in out.events if e["seq"] < seq] + list(checkpoint.events)
    if checkpoint.transcript:
        first, entries = checkpoint.transcript_first, list(checkpoint.transcript)
        if out.transcript:
            if first > out.transcript_first + len(out.transcript):
                return None
            if first < out.transcript_first:  # those before were moved out already
                entries = entries[out.transcript_first - first :]
                first = out.transcript_first
            out.transcript = out.transcript[: first - out.transcript_first] + entries
        else:
            out.transcript_first, out.transcript = first, entries
    return out


def _starts_with(records: list[JsonObject], prefix: list[JsonObject]) -> bool:
    """Whether ``records`` begins with the very objects of ``prefix`` (a tail built on another
    one shares its records; one read again from storage does not)."""
    return len(records) >= len(prefix) and all(a is b for a, b in zip(records, prefix, strict=False))


def _lines(first: int, body: bytes) -> list[tuple[int, Any]]:
    """(index, encoded line) of each record of a segment that starts at ``first``."""
    out: list[tuple[int, Any]] = []
    index = first
    for line in body.splitlines():
        out.append((index, line))
        index += span(line)
    return out


def _contiguous(spans: list[tuple[int, int, Any]]) -> bool:
    return all(spans[i][0] == spans[i - 1][1] + 1 for i in range(1, len(spans)))


def _span_of(item: Any) -> int:
    return doc_span(item) if isinstance(item, dict) else span(item)


def _stream(name: str) -> str:
    if name not in ("events", "transcript"):
        raise ValueError(f"unknown stream {name!r}")
    return name
