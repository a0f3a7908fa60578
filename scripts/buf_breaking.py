"""`buf breaking` (FILE rules) for proto/ against an earlier version of it from git.

Usage: python scripts/buf_breaking.py [--repo DIR] [REF]

With REF (a branch, tag or commit), the working tree is compared against it. Without one:
uncommitted changes to proto/ or buf.yaml are compared against HEAD; otherwise the newest
commit that changed proto/ is compared against its parent, so the latest change to the
contract is always the one checked (CI runs in a fresh clone where HEAD is main itself).
With no git history, or no commit before the first one that has proto/ (a first commit, a
shallow clone), it says so and skips (exit 0).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# buf (from the buf-bin wheel) is installed next to the interpreter running us.
BUF = Path(sys.executable).parent / "buf"
WATCHED = ["proto", "buf.yaml"]


def git(repo: Path, *args: str) -> str | None:
    """stdout of a git command, or None when it fails (no repository, unknown revision)."""
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def baseline(repo: Path, ref: str | None) -> tuple[str | None, str]:
    """(commit to compare against, or None to skip; what it is, for people)."""
    if git(repo, "rev-parse", "--is-inside-work-tree") != "true":
        return None, "not a git work tree"
    if ref:
        sha = git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        if not sha:
            raise SystemExit(f"buf_breaking: unknown git ref {ref!r}")
        return sha, f"{ref} ({sha[:12]})"
    head = git(repo, "rev-parse", "--verify", "--quiet", "HEAD")
    if head and git(repo, "status", "--porcelain", "--", *WATCHED):
        return head, f"HEAD ({head[:12]}), for the uncommitted changes to proto/ or buf.yaml"
    latest = git(repo, "log", "-1", "--format=%H", "--", "proto") if head else None
    if not latest:
        return None, "no commit has proto/ yet"
    parent = git(repo, "rev-parse", "--verify", "--quiet", f"{latest}^")
    if not parent:
        return None, f"no commit before {latest[:12]}, the newest change to proto/ (first or shallow commit)"
    if not git(repo, "ls-tree", "-d", parent, "proto"):
        return None, f"proto/ did not exist before {latest[:12]}"
    return parent, f"{parent[:12]}, the parent of {latest[:12]} (the newest commit that changed proto/)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("ref", nargs="?", help="git ref to compare against (default: see above)")
    parser.add_argument("--repo", type=Path, default=ROOT, help="repository root (default: this one)")
    ns = parser.parse_args()
    repo: Path = ns.repo.resolve()
    sha, what = baseline(repo, ns.ref)
    if sha is None:
        print(f"buf breaking: skipped: {what}")
        return 0
    print(f"buf breaking: proto/ against {what}")
    # buf clones the repository to find `ref`, 50 commits deep by default: reach further back.
    against = f".git#ref={sha},depth=1000"
    result = subprocess.run([str(BUF), "breaking", "--against", against], cwd=repo, check=False)
    if result.returncode != 0:
        print(
            "buf breaking: the change above breaks existing callers; keep the old field/RPC (deprecate it) "
            "or add a new version of the package",
            file=sys.stderr,
        )
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
