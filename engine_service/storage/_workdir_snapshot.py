"""Run directories that follow their run: snapshots of the workdir in the run's storage.

A run's directory (``{workdir_root}/{workspace}/{run}``) is on the local disk of the
process that ran its last step. So that a run can continue on another replica or on
a runner with its own disk, each checkpoint records a *manifest* of the directory
(path → sha256, size and mode; directories; symlinks that stay inside) and the
checkpoint's ``state.json`` names it. Contents are stored content-addressed among the
run's blobs (``wd-{sha256}``; the manifest itself is ``wdm-{sha256}``), so a checkpoint
uploads only files whose content the run's storage does not hold yet, and the tenant
boundary is the run's own prefix. Small files travel inside the manifest instead, and a
small manifest inside the state document (``workdir_inline``): a checkpoint of a directory
of a few small files (a turn that edited one) then writes nothing but its state.

Whoever takes a run over brings its local directory to the manifest: files whose
content differs are written, and files the previous manifest this host saw had but the
new one lacks (removed elsewhere since) are removed. Files this host created that no
manifest knows (e.g. dropped in by a person while the run waited) are left alone.

A host remembers, per run, the manifest it last synced to and the size, mtime, ctime
and inode of each file then (in memory, and in ``{workdir_root}/{workspace}/.snapshots/``
so a restarted process has it too), so an unchanged file is never read or hashed
again. Symlinks are kept only when they point inside the directory; devices, FIFOs and
sockets are skipped. A directory larger than ``max_bytes`` fails the run with
``ERR_WORKDIR_TOO_LARGE``: its next step could not continue anywhere else.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_service.core._errors import RunFailure
from engine_service.storage._protocol import Storage

log = logging.getLogger("machina.engine")

FILE_BLOB = "wd-"
MANIFEST_BLOB = "wdm-"
_CACHE_DIR = ".snapshots"
_HASH_IN_THREAD_BYTES = 256 * 1024  # hashing more than this at once leaves the event loop
_MAX_PATH_CHARS = 4096
_MEMORY_RUNS = 512  # runs whose sync state a process keeps in memory (the rest on disk)
# `take`: files up to INLINE_FILE_BYTES travel in the manifest (base64, at most INLINE_DATA_CHARS
# of it in all), and a manifest up to MANIFEST_INLINE_BYTES travels in the state document.
INLINE_FILE_BYTES = 2048
INLINE_DATA_CHARS = 8192
MANIFEST_INLINE_BYTES = 16384

# (size, mtime_ns, ctime_ns, inode): when all four match, the file has not changed.
StatKey = tuple[int, int, int, int]


@dataclass(slots=True)
class _Synced:
    """What a host knows about one run's directory: the manifest it last matched."""

    digest: str = ""  # of the manifest ("" = none yet)
    entries: dict[str, Any] = field(default_factory=dict)  # the manifest's entries
    stats: dict[str, StatKey] = field(default_factory=dict)  # of its files, when it was taken
    stored: set[str] = field(default_factory=set)  # file digests known to be in storage
    manifest: bytes = b""  # the manifest itself, once encoded or read here
    cache_file: Path | None = None  # where this host remembers it (see _remember)
    cache_len: int = 0  # the length this process last wrote there (0 = unknown)
    # Whether the manifest is among the run's blobs (one read from a host's cache counts as stored).
    manifest_stored: bool = True


class WorkdirTooLarge(RunFailure):
    def __init__(self, size: int, max_bytes: int) -> None:
        super().__init__(
            "ERR_WORKDIR_TOO_LARGE",
            f"the run directory holds {size} bytes, more than the {max_bytes} a checkpoint may "
            "snapshot (workdir_snapshot_max_bytes)",
            size=size,
            max_bytes=max_bytes,
        )


class WorkdirSnapshots:
    """Snapshots and restores run directories for one process; see the module docstring."""

    def __init__(self, workdir_root: Path, max_bytes: int) -> None:
        self._root = workdir_root
        self.max_bytes = max_bytes
        self._synced: OrderedDict[tuple[str, str], _Synced] = OrderedDict()
        self._cache_dirs: set[Path] = set()  # cache directories known to exist

    # -- the two hooks -------------------------------------------------------------------

    async def save(self, storage: Storage, ws: str, run_id: str, workdir: Path) -> str:
        """Snapshot ``workdir``; returns the manifest's digest (stored before it is returned)."""
        digest, _ = await self._save(storage, ws, run_id, workdir, inline=False)
        return digest

    async def take(self, storage: Storage, ws: str, run_id: str, workdir: Path) -> tuple[str, str]:
        """Snapshot ``workdir`` for a checkpoint: (the manifest's digest, the manifest itself when
        it is small enough to travel in the run's state document, else "" and it is stored).

        Small files travel inside the manifest too (``data``, base64), so a checkpoint of a
        directory of a few small files writes nothing but its state."""
        return await self._save(storage, ws, run_id, workdir, inline=True)

    async def _save(
        self, storage: Storage, ws: str, run_id: str, workdir: Path, *, inline: bool
    ) -> tuple[str, str]:
        synced = self._get(ws, run_id)
        entries, stats, changed = _scan(workdir, synced, self.max_bytes)
        if not entries and not synced.digest:
            return "", ""  # nothing to carry (most runs never write a file)
        contents = await _read_changed(workdir, {rel: entries[rel]["size"] for rel in changed})
        for rel in set(changed) - set(contents):  # removed since the scan
            del entries[rel]
            stats.pop(rel, None)
        # Unchanged files keep their content inline (see _scan); new contents share what is left.
        budget = INLINE_DATA_CHARS - sum(len(e.get("data", "")) for e in entries.values())
        for rel, (data, digest) in sorted(contents.items()):
            entry = entries[rel]
            entry["sha256"] = digest
            entry["size"] = len(data)
            if inline and len(data) <= INLINE_FILE_BYTES:
                text = base64.b64encode(data).decode()
                if len(text) <= budget:
                    entry["data"] = text
                    budget -= len(text)
                    continue
            if digest not in synced.stored:
                await storage.put_blob(ws, run_id, FILE_BLOB + digest, data)
                synced.stored.add(digest)
        if entries != synced.entries or not synced.digest:
            manifest = _encode({"v": 1, "entries": entries})
            synced.digest, synced.entries = hashlib.sha256(manifest).hexdigest(), entries
            synced.manifest, synced.manifest_stored = manifest, False
            synced.stats = stats
            self._remember(ws, run_id, synced)
        else:
            synced.stats = stats
        manifest = synced.manifest or _encode({"v": 1, "entries": synced.entries})
        synced.manifest = manifest
        if inline and len(manifest) <= MANIFEST_INLINE_BYTES:
            return synced.digest, manifest.decode()
        if not synced.manifest_stored:
            await storage.put_blob(ws, run_id, MANIFEST_BLOB + synced.digest, manifest)
            synced.manifest_stored = True
        return synced.digest, ""

    async def restore(
        self, storage: Storage, ws: str, run_id: str, workdir: Path, digest: str, manifest: str = ""
    ) -> None:
        """Bring ``workdir`` to the manifest ``digest`` names (nothing to do when it already is);
        ``manifest``: that manifest, when the state document carried it (see `take`)."""
        synced = self._get(ws, run_id)
        if not digest:
            if synced.digest:  # what this host remembers is not of this storage's run
                self._synced[(ws, run_id)] = _Synced()
            return
        if digest == synced.digest:
            synced.stored |= _stored_digests(synced.entries)
            return
        raw = manifest.encode() if manifest else await storage.get_blob(ws, run_id, MANIFEST_BLOB + digest)
        if raw is None or hashlib.sha256(raw).hexdigest() != digest:
            raise RuntimeError(f"run {run_id}: the workdir manifest {digest[:12]} is missing or damaged")
        entries = _valid_entries(json.loads(raw).get("entries", {}))
        fetched: dict[str, bytes] = {}
        for rel, entry in entries.items():
            if "sha256" in entry and not _same_file(workdir, rel, entry, synced):
                name = FILE_BLOB + entry["sha256"]
                if "data" in entry:
                    data: bytes | None = _inline_data(entry["data"])
                else:
                    data = await storage.get_blob(ws, run_id, name)
                if data is None or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    raise RuntimeError(f"run {run_id}: the workdir blob {name[:16]} is missing or damaged")
                fetched[rel] = data
        await asyncio.to_thread(_apply, workdir, synced.entries, entries, fetched)
        stats = {}
        for rel, entry in entries.items():
            if "sha256" in entry:
                with contextlib.suppress(OSError):
                    stats[rel] = _stat_key(os.lstat(workdir / rel))
        restored = _Synced(digest, entries, stats, _stored_digests(entries))
        restored.manifest, restored.manifest_stored = raw, not manifest
        self._remember(ws, run_id, restored)
        log.info("run %s: restored its directory from the run's storage (%d entries, %d fetched)",
                 run_id, len(entries), len(fetched), extra={"run_id": run_id})  # fmt: skip

    # -- what this host last synced to -------------------------------------------------------

    def _cache_file(self, ws: str, run_id: str) -> Path:
        return self._root / ws / _CACHE_DIR / f"{run_id}.json"

    def _cache_path(self, ws: str, run_id: str, synced: _Synced) -> Path:
        if synced.cache_file is None:
            synced.cache_file = self._cache_file(ws, run_id)
        return synced.cache_file

    def _get(self, ws: str, run_id: str) -> _Synced:
        key = (ws, run_id)
        synced = self._synced.get(key)
        if synced is None:
            synced = _Synced()
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                doc = _unseal(self._cache_file(ws, run_id).read_bytes())
                synced = _Synced(
                    doc["digest"],
                    _valid_entries(doc["entries"]),
                    {k: (v[0], v[1], v[2], v[3]) for k, v in doc["stats"].items()},
                )
                # Only what the storage's own manifest lists is known to be stored (a cache
                # file may outlive its storage); the first save re-checks nothing else.
                synced.stored = set()
            self._synced[key] = synced
            if len(self._synced) > _MEMORY_RUNS:
                self._synced.popitem(last=False)
        self._synced.move_to_end(key)
        return synced

    def _remember(self, ws: str, run_id: str, synced: _Synced) -> None:
        self._synced[(ws, run_id)] = synced
        path = self._cache_path(ws, run_id, synced)
        doc = {"digest": synced.digest, "entries": synced.entries, "stats": synced.stats}
        try:
            if path.parent not in self._cache_dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._cache_dirs.add(path.parent)
            # Rewritten in place (replacing a file costs a write-out on ext4); a torn or mixed
            # one fails its checksum and reads as no cache.
            data = _seal(_encode(doc))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.pwrite(fd, data, 0)
                if not 0 < synced.cache_len <= len(data):  # what may follow it is cut off
                    os.ftruncate(fd, len(data))
                synced.cache_len = len(data)
            finally:
                os.close(fd)
        except FileNotFoundError:  # its directory was removed meanwhile: made again next time
            self._cache_dirs.discard(path.parent)
        except OSError:  # only a cache: the next process rehashes instead
            log.debug("could not write the snapshot cache of run %s", run_id, exc_info=True)


# -- scanning ----------------------------------------------------------------------------------


def _seal(data: bytes) -> bytes:
    """``data`` followed by a line with its SHA-256: a cache file rewritten in place."""
    return data + b"\n" + hashlib.sha256(data).hexdigest().encode() + b"\n"


def _unseal(sealed: bytes) -> Any:
    data, _, digest = sealed.rstrip(b"\n").rpartition(b"\n")
    if hashlib.sha256(data).hexdigest().encode() != digest:
        raise ValueError("a torn snapshot cache")
    return json.loads(data)


def _encode(doc: Any) -> bytes:
    # ASCII escapes keep file names that are not UTF-8 (surrogate-escaped) round-tripping.
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _stat_key(st: os.stat_result) -> StatKey:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _inside_target(workdir: Path, rel: str, target: str) -> str | None:
    """A symlink's target relative to its own directory, if it stays inside ``workdir``; else None."""
    base = os.path.dirname(os.path.join(str(workdir), rel))
    resolved = os.path.normpath(os.path.join(base, target))
    root = str(workdir)
    if resolved != root and not resolved.startswith(root + os.sep):
        return None
    return os.path.relpath(resolved, base)


def _scan(
    workdir: Path, synced: _Synced, max_bytes: int
) -> tuple[dict[str, Any], dict[str, StatKey], list[str]]:
    """(entries, file stats, files to read) of ``workdir``; raises WorkdirTooLarge past ``max_bytes``."""
    entries: dict[str, Any] = {}
    stats: dict[str, StatKey] = {}
    changed: list[str] = []
    total = 0
    pending = [""]
    while pending:
        prefix = pending.pop()
        try:
            listing = os.scandir(os.path.join(str(workdir), prefix) if prefix else workdir)
        except FileNotFoundError:
            continue
        with listing:
            for item in listing:
                rel = f"{prefix}{item.name}"
                st = item.stat(follow_symlinks=False)
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISDIR(st.st_mode):
                    entries[rel] = {"dir": True, "mode": mode}
                    pending.append(rel + "/")
                elif stat.S_ISREG(st.st_mode):
                    total += st.st_size
                    if total > max_bytes:
                        raise WorkdirTooLarge(total, max_bytes)
                    key = _stat_key(st)
                    known = synced.entries.get(rel)
                    stats[rel] = key
                    if known is not None and "sha256" in known and synced.stats.get(rel) == key:
                        entries[rel] = {"sha256": known["sha256"], "size": st.st_size, "mode": mode}
                        if "data" in known:  # carried in the manifest: it stays there
                            entries[rel]["data"] = known["data"]
                    else:
                        entries[rel] = {"sha256": "", "size": st.st_size, "mode": mode}
                        changed.append(rel)
                elif stat.S_ISLNK(st.st_mode):
                    target = _inside_target(workdir, rel, os.readlink(item.path))
                    if target is not None:
                        entries[rel] = {"link": target}
                # Devices, FIFOs and sockets are not part of a run's files.
    return entries, stats, changed


async def _read_changed(workdir: Path, sizes: dict[str, int]) -> dict[str, tuple[bytes, str]]:
    """The content and sha256 of each changed file, by its size when scanned (off the event loop
    when there is much)."""
    root = str(workdir)

    def read() -> dict[str, tuple[bytes, str]]:
        out = {}
        for rel in sizes:
            with contextlib.suppress(FileNotFoundError):  # removed since the scan: gone next time
                data = _read_file(os.path.join(root, rel), sizes[rel])
                out[rel] = (data, hashlib.sha256(data).hexdigest())
        return out

    if not sizes:
        return {}
    return read() if sum(sizes.values()) <= _HASH_IN_THREAD_BYTES else await asyncio.to_thread(read)


def _read_file(path: str, size: int) -> bytes:
    """The content of the file at ``path`` (``size`` bytes when scanned), not following a
    last-moment symlink (plain reads: no buffered file object, which costs three more system
    calls and a buffer as large as the file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        chunks = []
        want = size + 1  # one read when the file did not grow meanwhile
        while chunk := os.read(fd, want):
            chunks.append(chunk)
            want = 1 << 16
        return b"".join(chunks)
    finally:
        os.close(fd)


# -- restoring ---------------------------------------------------------------------------------


def _valid_rel(rel: object) -> bool:
    if not isinstance(rel, str) or not rel or len(rel) > _MAX_PATH_CHARS or "\x00" in rel:
        return False
    if rel.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def _valid_entries(raw: object) -> dict[str, Any]:
    """The entries of a manifest, without any that could reach outside the directory."""
    if not isinstance(raw, dict):
        raise ValueError("a workdir manifest's entries must be an object")
    out: dict[str, Any] = {}
    for rel, entry in raw.items():
        if not _valid_rel(rel) or not isinstance(entry, dict):
            continue
        if "sha256" in entry and not (isinstance(entry["sha256"], str) and len(entry["sha256"]) == 64):
            continue
        if "link" in entry and not (isinstance(entry["link"], str) and not entry["link"].startswith("/")):
            continue
        if "data" in entry and not isinstance(entry["data"], str):
            continue
        out[rel] = entry
    if len(out) < len(raw):
        log.warning("skipped %d invalid entries of a workdir manifest", len(raw) - len(out))
    return out


def _stored_digests(entries: dict[str, Any]) -> set[str]:
    """The file digests a manifest's entries name among the run's blobs (not carried inline)."""
    return {e["sha256"] for e in entries.values() if "sha256" in e and "data" not in e}


def _inline_data(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return None


def _kind(entry: Any) -> str:
    return "dir" if entry.get("dir") else "link" if "link" in entry else "file"


def _local_kind(st: os.stat_result) -> str:
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "link"
    return "file" if stat.S_ISREG(st.st_mode) else "other"


def _same_file(workdir: Path, rel: str, entry: Any, synced: _Synced) -> bool:
    """Whether the local file at ``rel`` already has ``entry``'s content (hashing only if needed)."""
    try:
        st = os.lstat(workdir / rel)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != entry.get("size"):
        return False
    known = synced.entries.get(rel) or {}
    if known.get("sha256") == entry["sha256"] and synced.stats.get(rel) == _stat_key(st):
        return True
    with contextlib.suppress(OSError):
        fd = os.open(workdir / rel, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            return bool(hashlib.sha256(fh.read()).hexdigest() == entry["sha256"])
    return False


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # never follows symlinks
        else:
            path.unlink()


def _apply(workdir: Path, before: dict[str, Any], entries: dict[str, Any], fetched: dict[str, bytes]) -> None:
    """Make ``workdir`` hold ``entries`` (files from ``fetched``); drop what ``before`` had and they lack."""
    workdir.mkdir(parents=True, exist_ok=True)
    root = str(workdir.resolve())
    # Removed elsewhere since this host last synced: deepest first.
    for rel in sorted(set(before) - set(entries), key=lambda r: r.count("/"), reverse=True):
        _remove(workdir / rel)
    # Parents before children; a path of another kind here is replaced.
    for rel in sorted(entries, key=lambda r: (r.count("/"), r)):
        entry, path = entries[rel], workdir / rel
        parent = os.path.realpath(path.parent)
        if parent != root and not parent.startswith(root + os.sep):
            continue  # its parent is not a real directory inside (never expected; never followed)
        try:
            local = _local_kind(os.lstat(path))
        except FileNotFoundError:
            local = ""
        kind = _kind(entry)
        if local and local != kind:
            _remove(path)
            local = ""
        mode = int(entry.get("mode", 0o644 if kind == "file" else 0o755)) & 0o777
        if kind == "dir":
            if not local:
                path.mkdir()
            os.chmod(path, mode | 0o700)
        elif kind == "link":
            if local and os.readlink(path) == entry["link"]:
                continue
            if _inside_target(workdir, rel, entry["link"]) is None:
                continue
            if local:
                path.unlink()
            os.symlink(entry["link"], path)
        elif rel in fetched:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.restore")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(fetched[rel])
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        elif local:
            os.chmod(path, mode)
