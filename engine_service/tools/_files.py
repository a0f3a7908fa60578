"""Read, Write, Edit, Glob and Grep, confined to the run's workspace directory.

Every path the model gives is resolved (symlinks included) and must stay
inside the run's directory: no ``..`` escape, no absolute path elsewhere, no
symlink pointing out, no device, FIFO or socket. Sizes are capped so a huge
or endless file cannot exhaust the engine.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import stat
from pathlib import Path

import re2
from pydantic import BaseModel, Field

from engine_service.core._regex import PatternError, compile_pattern
from engine_service.core._text import clean_text, has_surrogate
from engine_service.tools._registry import ToolContext, ToolError, tool_from_callable

MAX_READ_BYTES = 2 * 1024 * 1024
MAX_WRITE_BYTES = 5 * 1024 * 1024
MAX_GLOB_RESULTS = 1000
MAX_GREP_MATCHES = 500
MAX_GREP_FILE_BYTES = 5 * 1024 * 1024
MAX_GREP_TOTAL_BYTES = 64 * 1024 * 1024
_BINARY_SNIFF = 8192


def _workdir(ctx: ToolContext) -> Path:
    if ctx.workdir is None:
        raise ToolError("this host gives the run no workspace directory")
    return ctx.workdir


def resolve_in_workdir(root: Path, user_path: str) -> Path:
    """The real path of ``user_path`` inside ``root``, or ToolError saying why not."""
    return _resolve(_real_root(root), user_path)


def _resolve(real_root: Path, user_path: str) -> Path:
    """`resolve_in_workdir` under the root's real path (``_real_root``, computed once per call)."""
    if not user_path or "\x00" in user_path:
        raise ToolError("path must be a non-empty string without NUL bytes")
    if has_surrogate(user_path):
        raise ToolError("path must be valid Unicode text (no lone surrogates)")
    candidate = Path(user_path)
    if not candidate.is_absolute():
        candidate = real_root / candidate
    real = _resolved(candidate)
    if real is None:
        raise ToolError(f"path {user_path!r} goes through a symlink loop")
    if real != real_root and real_root not in real.parents:
        raise ToolError(f"path {user_path!r} is outside the run's workspace directory")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return real
    except OSError as exc:
        raise ToolError(f"cannot access {user_path!r}: {exc.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ToolError(f"{user_path!r} is not a regular file or directory")
    return real


def _resolved(path: Path) -> Path | None:
    """The real path of ``path``; None when a symlink loop stops it resolving.

    realpath stops at a loop and keeps the rest as written: "loop/../etc/passwd" comes back as
    {dir}/etc/passwd even when {dir}/etc links to /etc. A fully resolved path resolves to itself.
    A path that exists is resolved once, strictly (a loop raises there); one that does not is
    resolved twice to check.
    """
    try:
        return Path(os.path.realpath(path, strict=True))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
    real = os.path.realpath(path)
    return Path(real) if os.path.realpath(real) == real else None


def _real_root(root: Path) -> Path:
    """The real path of a run directory, resolved once per process: a directory later swapped for
    a symlink does not move it, since every path is still resolved whole and must land under it."""
    key = str(root)
    real = _REAL_ROOTS.get(key)
    if real is None:
        real = Path(os.path.realpath(root))
        if len(_REAL_ROOTS) >= _REAL_ROOTS_KEPT:
            _REAL_ROOTS.clear()
        _REAL_ROOTS[key] = real
    return real


_REAL_ROOTS: dict[str, Path] = {}
_REAL_ROOTS_KEPT = 4096


def _relative(real_root: Path, path: Path) -> str:
    """``path`` relative to ``real_root`` (``_real_root``, computed once per call, not per path)."""
    # A file name that is not UTF-8 comes back from the OS with lone surrogates
    # (surrogateescape), which no transcript can store: show those bytes as U+FFFD.
    return clean_text(str(path.relative_to(real_root))) or "."


def _read_bytes(path: Path, user_path: str, limit: int) -> tuple[bytes, int]:
    """Up to ``limit`` bytes of a regular file (opened without following a last-moment symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ToolError(f"{user_path!r} does not exist") from None
    except IsADirectoryError:
        raise ToolError(f"{user_path!r} is a directory") from None
    except OSError as exc:
        raise ToolError(f"cannot open {user_path!r}: {exc.strerror}") from None
    try:  # plain reads, sized by the file: no buffered file object and its system calls
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ToolError(f"{user_path!r} is not a regular file")
        chunks, left = [], limit
        want = min(left, info.st_size + 1)  # one read when the file did not grow meanwhile
        while left > 0 and (chunk := os.read(fd, want)):
            chunks.append(chunk)
            left -= len(chunk)
            want = min(left, 1 << 16)
        return b"".join(chunks), info.st_size
    finally:
        os.close(fd)


def _is_binary(data: bytes) -> bool:
    return b"\x00" in data[:_BINARY_SNIFF]


class ReadArgs(BaseModel):
    path: str = Field(description="File path, relative to the run's workspace directory.")
    offset: int = Field(1, ge=1, description="First line to return (1-based).")
    limit: int = Field(2000, ge=1, le=20_000, description="Maximum number of lines to return.")


async def read(args: ReadArgs, ctx: ToolContext) -> str:
    """Read a text file from the workspace directory, with line numbers."""
    # Read, Write and Edit stay on the loop: bounded (2 MB, 5 MB) and linear, a few ms at most,
    # and a turn's calls then act on a file in call order (two Edits never race).
    return _read(_workdir(ctx), args)


def _read(root: Path, args: ReadArgs) -> str:
    path = resolve_in_workdir(root, args.path)
    data, size = _read_bytes(path, args.path, MAX_READ_BYTES)
    if _is_binary(data):
        return f"{args.path} is a binary file ({size} bytes); not shown."
    lines = data.decode("utf-8", errors="replace").splitlines()
    chosen = lines[args.offset - 1 : args.offset - 1 + args.limit]
    out = "\n".join(f"{n:6d}\t{line}" for n, line in enumerate(chosen, start=args.offset))
    notes = []
    if size > MAX_READ_BYTES:
        notes.append(f"only the first {MAX_READ_BYTES} of {size} bytes were read")
    if args.offset - 1 + args.limit < len(lines):
        notes.append(f"{len(lines)} lines in all; pass offset to read more")
    return out + (f"\n[{'; '.join(notes)}]" if notes else "")


class WriteArgs(BaseModel):
    path: str = Field(description="File path, relative to the run's workspace directory.")
    content: str = Field(description="The whole new content of the file.")


async def write(args: WriteArgs, ctx: ToolContext) -> str:
    """Create or overwrite a text file in the workspace directory."""
    return _write(_workdir(ctx), args)


def _write(root: Path, args: WriteArgs) -> str:
    data = args.content.encode()
    if len(data) > MAX_WRITE_BYTES:
        raise ToolError(f"content is {len(data)} bytes; the limit is {MAX_WRITE_BYTES}")
    real_root = _real_root(root)
    path = _resolve(real_root, args.path)
    if path.is_dir():
        raise ToolError(f"{args.path!r} is a directory")
    parent = _resolve(real_root, str(path.parent))
    parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, data)
    return f"wrote {len(data)} bytes to {_relative(real_root, path)}"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.machina-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


class EditArgs(BaseModel):
    path: str = Field(description="File path, relative to the run's workspace directory.")
    old_string: str = Field(min_length=1, description="Exact text to replace.")
    new_string: str = Field(description="Replacement text.")
    replace_all: bool = Field(False, description="Replace every occurrence instead of exactly one.")


async def edit(args: EditArgs, ctx: ToolContext) -> str:
    """Replace exact text in a file. old_string must occur exactly once unless replace_all is set."""
    return _edit(_workdir(ctx), args)


def _edit(root: Path, args: EditArgs) -> str:
    real_root = _real_root(root)
    path = _resolve(real_root, args.path)
    data, size = _read_bytes(path, args.path, MAX_WRITE_BYTES + 1)
    if size > MAX_WRITE_BYTES:
        raise ToolError(f"{args.path!r} is {size} bytes; Edit handles files up to {MAX_WRITE_BYTES}")
    if _is_binary(data):
        raise ToolError(f"{args.path!r} is a binary file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolError(f"{args.path!r} is not valid UTF-8 text") from None
    count = text.count(args.old_string)
    if count == 0:
        raise ToolError(f"old_string was not found in {args.path!r}; read the file and copy the text exactly")
    if count > 1 and not args.replace_all:
        raise ToolError(
            f"old_string occurs {count} times in {args.path!r}; add surrounding context to make it unique "
            "or set replace_all"
        )
    updated = text.replace(args.old_string, args.new_string, -1 if args.replace_all else 1)
    _write_atomic(path, updated.encode())
    where = _relative(real_root, path)
    return f"replaced {count if args.replace_all else 1} occurrence(s) in {where}"


class GlobArgs(BaseModel):
    pattern: str = Field(description="Glob pattern such as '**/*.py', relative to path.")
    path: str = Field(".", description="Directory to search, relative to the workspace directory.")


def _check_pattern(pattern: str) -> None:
    if not pattern or "\x00" in pattern or pattern.startswith("/") or ".." in Path(pattern).parts:
        raise ToolError("pattern must be relative and must not contain '..'")


def _glob_regex(pattern: str, *, spans_dirs: bool = True) -> re2._Regexp[str]:
    """Glob to an RE2 regex: ``**/`` spans directories, ``*`` and ``?`` stay within one, ``[...]``
    is a class (``[!...]`` negated). With ``spans_dirs=False`` (a file name) ``**`` is ``*``.

    RE2, because a model's ``*a*a*a*a*a*b`` against a long name backtracks for hours in ``re``.
    """
    out, i = [], 0
    while i < len(pattern):
        if spans_dirs and pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif spans_dirs and pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            escaped = "".join("\\" + c if c in "\\^[]" else c for c in body)
            out.append(f"[{'^' if negate else ''}{escaped}]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    try:
        return compile_pattern("".join(out))
    except PatternError as exc:
        raise ToolError(f"invalid glob pattern {pattern!r}: {exc}") from None


def _walk(real_root: Path, base: Path) -> list[Path]:
    """Regular files under ``base`` whose real path stays in ``real_root`` (symlinks out are skipped)."""
    found: list[Path] = []
    for directory, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(directory) / name
            real = _resolved(path)
            if real is not None and real_root in real.parents and real.is_file():
                found.append(path)
    return found


async def glob(args: GlobArgs, ctx: ToolContext) -> str:
    """List files in the workspace directory matching a glob pattern."""
    root = _workdir(ctx)
    _check_pattern(args.pattern)
    regex = _glob_regex(args.pattern)
    # Walking a large tree is CPU and disk work: off the event loop, like every file tool's.
    return await asyncio.to_thread(_glob, root, args.path, regex)


def _glob(root: Path, user_path: str, regex: re2._Regexp[str]) -> str:
    base = resolve_in_workdir(root, user_path)
    if not base.is_dir():
        raise ToolError(f"{user_path!r} is not a directory")
    real_root = _real_root(root)
    matches = [
        _relative(real_root, p)
        for p in _walk(real_root, base)
        # A name that is not UTF-8 holds lone surrogates, which RE2 (UTF-8) cannot take: U+FFFD there.
        if regex.fullmatch(clean_text(str(p.relative_to(base))))
    ]
    if not matches:
        return "no files match"
    shown = matches[:MAX_GLOB_RESULTS]
    more = f"\n[{len(matches) - len(shown)} more not shown]" if len(matches) > len(shown) else ""
    return "\n".join(shown) + more


class GrepArgs(BaseModel):
    pattern: str = Field(
        description="Regular expression (RE2 syntax: no backreferences or lookaround).",
    )
    path: str = Field(".", description="File or directory to search, relative to the workspace directory.")
    glob: str | None = Field(None, description="Only search files whose name matches this glob, e.g. '*.py'.")
    ignore_case: bool = False


async def grep(args: GrepArgs, ctx: ToolContext) -> str:
    """Search file contents in the workspace directory; prints path:line:text for each match."""
    root = _workdir(ctx)
    try:
        regex = compile_pattern(args.pattern, ignore_case=args.ignore_case)
    except PatternError as exc:
        raise ToolError(f"invalid regular expression: {exc}") from None
    name_regex = _glob_regex(args.glob, spans_dirs=False) if args.glob else None
    # RE2 matches in linear time and releases the GIL: a worker thread keeps the loop answering.
    return await asyncio.to_thread(_grep, root, args.path, regex, name_regex)


def _grep(root: Path, user_path: str, regex: re2._Regexp[str], name_regex: re2._Regexp[str] | None) -> str:
    base = resolve_in_workdir(root, user_path)
    real_root = _real_root(root)
    files = [base] if base.is_file() else _walk(real_root, base)
    out: list[str] = []
    scanned = 0
    for path in files:
        if name_regex is not None and not name_regex.fullmatch(clean_text(path.name)):
            continue
        if scanned >= MAX_GREP_TOTAL_BYTES:
            out.append(f"[stopped after searching {MAX_GREP_TOTAL_BYTES} bytes; narrow path or glob]")
            break
        data, _ = _read_bytes(path, str(path), MAX_GREP_FILE_BYTES)
        scanned += len(data)
        if _is_binary(data):
            continue
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            if regex.search(line):
                out.append(f"{_relative(real_root, path)}:{number}:{line[:500]}")
                if len(out) >= MAX_GREP_MATCHES:
                    return "\n".join(out) + f"\n[stopped after {MAX_GREP_MATCHES} matches]"
    return "\n".join(out) if out else "no matches"


READ = tool_from_callable(read, name="Read", idempotent=True)
WRITE = tool_from_callable(write, name="Write", idempotent=True)
EDIT = tool_from_callable(edit, name="Edit", idempotent=False)
GLOB = tool_from_callable(glob, name="Glob", idempotent=True)
GREP = tool_from_callable(grep, name="Grep", idempotent=True)
