"""What a checkpoint spends carrying the run directory into storage (storage/_workdir_snapshot.py).

A run directory of 200 files of 1 KiB in 10 subdirectories, already snapshotted once; then
``WorkdirSnapshots.save`` is timed as a checkpoint calls it, for an unchanged directory (a
stat of every entry, nothing read or stored) and a lightly changed one (one file rewritten:
it is read, hashed and stored, with a new manifest). ``python -m bench.workdir`` prints both.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from engine_service import LocalStorage, Storage
from engine_service.testing import WorkdirSnapshots

FILES = 200


def _populate(workdir: Path) -> None:
    for i in range(FILES):
        path = workdir / f"d{i % 10}" / f"f{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{i:04d}".encode() * 256)


async def checkpoint_ms(storage: Storage, root: Path, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per snapshot of an unchanged and of a one-file-changed 200-file directory."""
    await storage.create_run("bench", "wd", {}, {})
    snapshots = WorkdirSnapshots(root, 1 << 30)
    workdir = root / "bench" / "wd"
    _populate(workdir)
    await snapshots.save(storage, "bench", "wd", workdir)
    out: dict[str, list[float]] = {"unchanged": [], "changed": []}
    for n in range(repeats):
        started = time.perf_counter()
        await snapshots.save(storage, "bench", "wd", workdir)
        out["unchanged"].append((time.perf_counter() - started) * 1000)
        (workdir / "d3" / "f3.txt").write_bytes(f"change {n}".encode() * 100)
        started = time.perf_counter()
        await snapshots.save(storage, "bench", "wd", workdir)
        out["changed"].append((time.perf_counter() - started) * 1000)
    return out


async def _main(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        storage = LocalStorage(Path(tmp) / "storage")
        timings = await checkpoint_ms(storage, Path(tmp) / "work", repeats)
        await storage.close()
    print(json.dumps({k: sorted(v)[len(v) // 2] for k, v in timings.items()}))


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1]) if len(sys.argv) > 1 else 50))
