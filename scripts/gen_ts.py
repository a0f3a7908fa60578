"""Generate the TypeScript stubs for proto/ into examples/ts-client/src/gen/ (or check they are current).

Usage: python scripts/gen_ts.py [--check]

Runs `buf generate --template buf.gen.ts.yaml` with the local protoc-gen-es pinned in
examples/ts-client/package-lock.json (installed with `npm ci` when node_modules is missing
or older than the lock file). The output is committed, so the example runs without buf;
`--check` regenerates into a temporary directory and fails when anything differs.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TS_CLIENT = ROOT / "examples" / "ts-client"
GEN = Path("examples/ts-client/src/gen")
TEMPLATE = "buf.gen.ts.yaml"
# buf (from the buf-bin wheel) is installed next to the interpreter running us.
BUF = Path(sys.executable).parent / "buf"


def ensure_node_modules() -> None:
    marker = TS_CLIENT / "node_modules" / ".package-lock.json"
    if marker.exists() and marker.stat().st_mtime >= (TS_CLIENT / "package-lock.json").stat().st_mtime:
        return
    if not shutil.which("npm"):
        raise SystemExit("npm is needed to install the pinned protoc-gen-es (Node.js 20 or newer)")
    print("npm ci in examples/ts-client", file=sys.stderr)
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline"], cwd=TS_CLIENT, check=True)


def generate(base: Path | None = None) -> None:
    """Into the committed directory, or under ``base`` (same relative layout) for a check."""
    args = [str(BUF), "generate", "--template", TEMPLATE, *(["--output", str(base)] if base else [])]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"buf generate failed:\n{result.stderr}")


def differences(a: Path, b: Path) -> list[str]:
    names_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    names_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    diff = sorted(str(n) for n in names_a ^ names_b)
    diff += sorted(str(n) for n in names_a & names_b if not filecmp.cmp(a / n, b / n, shallow=False))
    return diff


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--check", action="store_true", help=f"fail if {GEN}/ is stale")
    ns = parser.parse_args()
    ensure_node_modules()
    if not ns.check:
        generate()
        print(f"generated {sum(1 for _ in (ROOT / GEN).rglob('*.ts'))} files into {GEN}/")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        current = ROOT / GEN
        stale = differences(Path(tmp) / GEN, current) if current.exists() else [f"{GEN}/ missing"]
    if stale:
        print("TypeScript stubs are stale; run `just gen-ts`:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    print("TypeScript stubs are up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
