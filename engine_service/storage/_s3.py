"""The S3-compatible storage adapter (AWS S3, Cloudflare R2, MinIO) on aioboto3.

Same layout and guarantees as the local adapter (see _protocol.py), with the
object store's own tools: every object is written whole (no torn state.json);
segments are immutable objects named ``{first}-{last}.jsonl``, one per
checkpoint, so nothing rewrites the history; creation, idempotency keys and
the run lease use conditional writes (``If-None-Match: *`` / ``If-Match``).
5xx, throttling, timeouts and dropped connections are retried by botocore with
exponential backoff and jitter; a conditional write whose first attempt landed
but whose answer was lost is recognised on the retry by reading back.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from engine_service.core._ids import check_id
from engine_service.core._types import JsonObject
from engine_service.storage._protocol import (
    Checkpoint,
    StorageCredentialsMissing,
    StorageUnavailable,
    commit_in_steps,
    doc_parts,
)
from engine_service.storage._records import doc_span, dump_lines, dumps, loads, span

_DIGITS = 12


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
        return await self._put_new(self._run(ws, run_id, "state.json"), dumps(state))

    async def read_spec(self, ws: str, run_id: str) -> JsonObject | None:
        return await self._get_json(self._run(ws, run_id, "spec.json"))

    async def read_state(self, ws: str, run_id: str) -> JsonObject | None:
        return await self._get_json(self._run(ws, run_id, "state.json"))

    async def write_state(self, ws: str, run_id: str, state: JsonObject) -> None:
        await self._put(self._run(ws, run_id, "state.json"), dumps(state))

    async def commit(self, ws: str, run_id: str, checkpoint: Checkpoint) -> None:
        await commit_in_steps(self, ws, run_id, checkpoint)

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
        out: list[JsonObject] = []
        cursor = after + 1
        for first, last, key in await self._segments(ws, run_id, stream):
            if last < cursor or first > cursor:
                continue  # behind us, or (never after drop_uncommitted) a gap
            found = await self._get(key)
            if found is None:
                continue
            index = first  # of the line's first record: a line may stand for several
            for line in found[0].splitlines():
                n = span(line)
                if index + n - 1 >= cursor and index <= upto:
                    out.append(loads(line))
                index += n
            cursor = last + 1
            if cursor > upto:
                break
        return out

    async def drop_uncommitted(self, ws: str, run_id: str, stream: str, committed: int) -> None:
        s3 = await self._s3()
        for first, last, key in await self._segments(ws, run_id, stream):
            # A segment is committed whole or not at all: state.json moves to its last record.
            if first > committed or last > committed:
                with _faults():
                    await s3.delete_object(Bucket=self._bucket, Key=key)

    async def repair_end(self, ws: str, run_id: str, stream: str) -> int:
        # Segments are written whole or not at all: nothing is ever torn.
        return max((last for _, last, _ in await self._segments(ws, run_id, stream)), default=0)

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
        keys, _ = await self._list(self._run(ws, run_id) + "/")
        if keys:
            await self._delete(*keys)

    async def acquire_lease(self, ws: str, run_id: str, owner: str, ttl: float) -> bool:
        key = self._run(ws, run_id, "lease.json")
        doc = dumps({"owner": owner, "expires_at": time.time() + ttl})
        current = await self._get(key)
        if current is None:
            if await self._put(key, doc, IfNoneMatch="*") is not None:
                return True
        else:
            held = loads(current[0])
            if held["owner"] != owner and held["expires_at"] > time.time():
                return False
            if await self._put(key, doc, IfMatch=current[1]) is not None:
                return True
        # Lost a race, or our own write landed but its answer did not: read back.
        latest = await self._get_json(key)
        return latest is not None and latest.get("owner") == owner

    async def release_lease(self, ws: str, run_id: str, owner: str) -> None:
        key = self._run(ws, run_id, "lease.json")
        current = await self._get(key)
        if current is not None and loads(current[0]).get("owner") == owner:
            # Expire rather than delete: If-Match keeps us from clobbering a new owner.
            await self._put(key, dumps({"owner": owner, "expires_at": 0}), IfMatch=current[1])

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None


def _stream(name: str) -> str:
    if name not in ("events", "transcript"):
        raise ValueError(f"unknown stream {name!r}")
    return name
