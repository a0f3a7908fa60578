"""Storage: the protocol every adapter implements, and the layout they share.

Layout under the root (the same for every adapter)::

    workspaces/{workspace_id}/runs/{run_id}/spec.json        written once
    workspaces/{workspace_id}/runs/{run_id}/state.json       status + checkpoint, atomic
    workspaces/{workspace_id}/runs/{run_id}/commits/{n:012d}.jsonl  later states (local adapter)
    workspaces/{workspace_id}/runs/{run_id}/events/{first:012d}.jsonl       numbered segments
    workspaces/{workspace_id}/runs/{run_id}/transcript/{first:012d}.jsonl
    workspaces/{workspace_id}/runs/{run_id}/lease.json       one writer at a time
    workspaces/{workspace_id}/runs/{run_id}/blobs/{name}     opaque bytes, see below
    workspaces/{workspace_id}/requests/{request_id}.json     idempotency keys
    workspaces/{workspace_id}/docs/{key}.json                workspace documents (threads)
    shared/{name}.json                                       documents every process shares

A run's blobs are what does not belong in its state: full tool results too large for the
transcript (``result_blob_name``), a cancel request left by another process
(``cancel-request``), webhook notifications and their delivery log, and the run
directory's snapshots (``wd-{sha256}`` file contents, ``wdm-{sha256}`` manifests; see
``_workdir_snapshot``). Shared documents are the catalogues of MCP tools a runner
publishes (``mcp-{server}``) and the index of pending webhook notifications.
Workspace documents are small JSON documents keyed by a path of ids (``a/b/c``): the
threads, which run holds which place in a thread, and which forks share a run's history.
Deleting a run removes everything under its directory.

The event log and the transcript are numbered segments: a segment is named by
the index of its first record and holds consecutive records, so nothing ever
rewrites the history and a checkpoint costs the same at turn 1 and turn 1,000.
(The local adapter appends to the newest segment until it holds
``SEGMENT_RECORDS`` records, because creating a file costs far more than an
append; an object store writes one immutable segment per checkpoint instead.)

Records are compact JSON, one a line (see ``_records``). A record of the event log may
stand for several consecutive indexes: a run's text deltas written together are one record
``{"seq": first, "n": count, ...}`` (those two keys first, so a reader learns the span from a
line's first bytes); every other record stands for one. Ranges (``read_segments``,
``drop_uncommitted``, ``repair_end``) count indexes, and a range that starts inside a record
returns that whole record.

The local adapter writes a run's first state as ``state.json`` and each later one as a record
appended to its commit log ``commits/{n}.jsonl``, the newest whole record of the highest
numbered log counting (appending costs far less than creating or replacing a file; see
``LocalStorage`` for what a record carries in fsync mode); an object store replaces
``state.json``.

The two streams commit differently:

- events are written ahead: a process writes each event before any watcher
  sees it, so every event a watcher was ever shown is in the log, also after
  a crash. ``state.json``'s ``last_seq`` says how far the last checkpoint got;
  a recovering writer keeps what lies past it (``repair_end`` drops only a
  torn last record) and marks it rolled back in its ``resumed`` event.
- transcript entries only count once ``state.json``'s ``transcript_len`` says
  so; whatever a writer wrote past it before dying is ignored by readers and
  removed by the next writer (``drop_uncommitted``).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine_service.core._ids import check_id
from engine_service.core._types import JsonObject

_SEGMENT_DIGITS = 12


class StorageUnavailable(Exception):
    """Storage cannot serve a request now (read-only, full, unreachable, answering 5xx).

    Adapters raise it (or an `OSError` such as ``EROFS``/``ENOSPC``, see `storage_fault`)
    for faults that may pass; the run waits and retries instead of failing.
    """


# File-system errors that are the storage being unavailable, not a bug in the engine.
_FAULT_ERRNOS = frozenset(
    {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO, errno.EAGAIN}
)


class StateConflict(Exception):
    """Another writer replaced the run's state since this process last read or wrote it: this
    one's lease went stale, and it must stop writing (raised by adapters that can tell)."""


class StorageCredentialsMissing(StorageUnavailable):
    """The storage refuses for want of credentials: a setting to fix, not an outage to wait out."""


def storage_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is storage being unavailable (worth waiting for) rather than a bug."""
    return isinstance(exc, StorageUnavailable) or (isinstance(exc, OSError) and exc.errno in _FAULT_ERRNOS)


@dataclass(frozen=True, slots=True)
class Lease:
    owner: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What one checkpoint of a run commits (see `Storage.commit`)."""

    # The run's state document; its ``last_seq`` counts events written ahead (write_segment),
    # its ``transcript_len`` the transcript entries up to the last of ``transcript``.
    state: JsonObject
    # New transcript entries, the first numbered ``transcript_first`` (none: nothing new).
    transcript_first: int = 0
    transcript: Sequence[JsonObject] = ()
    # Blobs the checkpoint replaces whole (e.g. a subagent's transcript), by name.
    blobs: Mapping[str, bytes] = field(default_factory=dict)
    # Events not written ahead yet (consecutive, the first right after the last written one):
    # committed with the state, shown to watchers once it is.
    events: Sequence[JsonObject] = ()


class Storage(Protocol):
    """What the engine needs from storage. All ids are validated by the caller."""

    # How long a run's writer gathers events before writing them ahead (seconds). 0 writes at
    # once; an object store, which pays a request per write, trades a little latency for fewer
    # and larger segments.
    event_flush_delay: float

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

    async def commit(self, ws: str, run_id: str, checkpoint: Checkpoint) -> None:
        """Write a checkpoint: its transcript entries and blobs, then the state that commits them.

        Readers see the previous state or this one, never this one without what it commits;
        a commit that raised may be retried with the same checkpoint. `commit_in_steps` does it
        with the operations above; an adapter may do it its own cheaper way.
        """
        ...

    async def read_segments(
        self, ws: str, run_id: str, stream: str, after: int, upto: int
    ) -> list[JsonObject]:
        """Records with index in ``(after, upto]`` (1-based), in order."""
        ...

    async def drop_uncommitted(self, ws: str, run_id: str, stream: str, committed: int) -> None:
        """Delete segments starting after ``committed`` (left by a writer that died)."""
        ...

    async def repair_end(self, ws: str, run_id: str, stream: str) -> int:
        """The index of the last complete record of ``stream``, after dropping a torn one (0 if none)."""
        ...

    async def put_blob(self, ws: str, run_id: str, name: str, data: bytes) -> None:
        """Store a large payload of the run (e.g. a full tool result) under ``name``."""
        ...

    async def get_blob(self, ws: str, run_id: str, name: str) -> bytes | None: ...

    async def put_shared(self, name: str, doc: JsonObject) -> None:
        """A document shared by every process on this storage (e.g. a runner's MCP tool catalogue)."""
        ...

    async def get_shared(self, name: str) -> JsonObject | None: ...

    async def list_runs(self, ws: str) -> list[str]: ...

    async def list_workspaces(self) -> list[str]: ...

    async def put_if_absent(self, ws: str, key: str, doc: JsonObject) -> JsonObject | None:
        """Store ``doc`` under workspace key ``key`` unless present; return the existing one if it was."""
        ...

    async def delete_request_key(self, ws: str, key: str) -> None:
        """Forget the idempotency key ``key`` (its run was deleted)."""
        ...

    async def put_doc(self, ws: str, key: str, doc: JsonObject, *, create_only: bool = False) -> bool:
        """Store a workspace document under ``key`` (ids joined by ``/``). With ``create_only``,
        only if none is there: False when one was (and it is left as it was)."""
        ...

    async def get_doc(self, ws: str, key: str) -> JsonObject | None: ...

    async def list_docs(self, ws: str, prefix: str) -> list[str]:
        """The keys of the documents under ``prefix`` (at any depth), sorted."""
        ...

    async def delete_doc(self, ws: str, key: str) -> None:
        """Remove the document (nothing happens when there is none)."""
        ...

    async def delete_run(self, ws: str, run_id: str) -> None:
        """Remove every object of the run: spec, state, events, transcript, lease, blobs."""
        ...

    async def acquire_lease(self, ws: str, run_id: str, owner: str, ttl: float) -> bool:
        """Take or renew the run's lease for ``owner``; False if another owner holds a live one."""
        ...

    async def renew_lease(self, ws: str, run_id: str, owner: str, ttl: float) -> bool:
        """Extend a lease ``owner`` holds; False if it no longer does: another owner took the run
        (even one that has released it since), or ``owner`` released it. A lease of ``owner``
        that expired with nobody taking it since is extended."""
        ...

    async def release_lease(self, ws: str, run_id: str, owner: str) -> None: ...

    async def close(self) -> None: ...


async def commit_in_steps(storage: Storage, ws: str, run_id: str, checkpoint: Checkpoint) -> None:
    """`Storage.commit` by the other operations: the events' and the transcript's segments, the
    blobs, the state."""
    if checkpoint.events:
        await storage.write_segment(
            ws, run_id, "events", checkpoint.events[0]["seq"], list(checkpoint.events)
        )
    if checkpoint.transcript:
        await storage.write_segment(
            ws, run_id, "transcript", checkpoint.transcript_first, list(checkpoint.transcript)
        )
    for name, data in checkpoint.blobs.items():
        await storage.put_blob(ws, run_id, name, data)
    await storage.write_state(ws, run_id, checkpoint.state)


def doc_parts(key: str) -> list[str]:
    """The ids a document key is made of (each one checked, so a key never leaves its folder)."""
    parts = key.split("/")
    return [check_id(part, "document key") for part in parts]


def segment_name(first: int) -> str:
    return f"{first:0{_SEGMENT_DIGITS}d}.jsonl"


def segment_starts(names: list[str]) -> list[int]:
    """The first indexes of the segments among ``names``, sorted."""
    starts = []
    for name in names:
        stem, dot, ext = name.partition(".")
        if dot and ext == "jsonl" and stem.isdigit() and len(stem) == _SEGMENT_DIGITS:
            starts.append(int(stem))
    return sorted(starts)
