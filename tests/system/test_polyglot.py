"""Callers in other languages: the TypeScript example client and `buf curl` against a real engine
process, and the checks that keep the API surface honest (reference page, error codes, buf breaking)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.rpc import error_details_pb2

from client_py import EngineClient
from tests.conftest import ROOT
from tests.node import require_ts_client, run_ts
from tests.processes import EngineProcess

BUF = Path(sys.executable).parent / "buf"
ACME_KEY = "sk-acme-polyglot-test-0001"
GLOBEX_KEY = "sk-globex-polyglot-test-0002"


def start_engine(tmp: Path, *args: str) -> EngineProcess:
    """The engine with the demo's tools (send_email needs approval), storage under ``tmp``."""
    return EngineProcess(
        tmp,
        "--config",
        "demo/engine.toml",
        "--storage",
        str(tmp / "data"),
        *args,
        env={"MACHINA_WORKDIR_ROOT": str(tmp / "workdirs")},
    )


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[EngineProcess]:
    process = start_engine(tmp_path)
    yield process
    process.close()


@pytest.fixture
def keyed_engine(tmp_path: Path) -> Iterator[EngineProcess]:
    keys = tmp_path / "keys.toml"
    keys.write_text(f'"{ACME_KEY}" = {{ workspace = "acme", name = "ts-bot" }}\n"{GLOBEX_KEY}" = "globex"\n')
    process = start_engine(tmp_path, "--api-keys-file", str(keys))
    yield process
    process.close()


@pytest.mark.slow
@pytest.mark.timeout(180)  # the first Node test of a session may run `npm ci`
def test_ts_client_creates_streams_approves_and_waits(engine: EngineProcess) -> None:
    require_ts_client()
    result = run_ts("main.ts", "--run-id", "ts-run-1", env={"MACHINA_TARGET": engine.target})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "created run ts-run-1" in out
    assert "tool get_weather" in out
    assert "approval needed: Call send_email" in out
    assert "→ approving send_email" in out
    assert "approve by local-user" in out
    assert "✔ send_email: queued message" in out
    assert "final state: DONE" in out
    assert "answer: Done: I emailed Alice the Paris weather." in out
    # Events are printed in seq order, each once, and the stream ended with the run.
    seqs = [int(s) for s in re.findall(r"^#(\d+)", out, flags=re.MULTILINE)]
    assert seqs == sorted(set(seqs))
    assert out.index("run finished: DONE") < out.index("final state: DONE")

    # The Python client sees the same run, approved by the Node client.
    with EngineClient(engine.target) as client:
        run = client.get_run("ts-run-1")
        assert (run.state, run.meta.turns) == ("DONE", 3)
        decided = [e for e in client.attach("ts-run-1").events(follow=False) if e.kind == "approval_decided"]
        assert [e.decision for e in decided] == ["approve"]  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.timeout(180)  # the first Node test of a session may run `npm ci`
def test_ts_client_follows_up_on_the_thread(engine: EngineProcess) -> None:
    require_ts_client()
    result = run_ts(
        "main.ts",
        "--run-id",
        "ts-thread-1",
        "--follow-up",
        "And Berlin?",
        env={"MACHINA_TARGET": engine.target},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "follow-up run " in result.stdout
    assert "on thread ts-thread-1" in result.stdout
    with EngineClient(engine.target) as client:
        thread = client.get_thread("ts-thread-1")
        assert len(thread.run_ids) == 2
        assert thread.run_ids[0] == "ts-thread-1"
        follow_up = client.get_run(thread.run_ids[1])
        assert follow_up.task == "And Berlin?"
        assert follow_up.thread_id == "ts-thread-1"
    assert f"thread ts-thread-1: ts-thread-1 → {thread.run_ids[1]}" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ts_client_api_keys_and_workspaces(keyed_engine: EngineProcess) -> None:
    require_ts_client()
    target = {"MACHINA_TARGET": keyed_engine.target}
    acme = {**target, "MACHINA_API_KEY": ACME_KEY}

    result = run_ts("main.ts", "--run-id", "acme-run", env=acme)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "in workspace acme" in result.stdout
    assert "approve by ts-bot" in result.stdout  # the key's name, never the key
    assert ACME_KEY not in result.stdout

    got = run_ts("probe.ts", "get-run", "acme-run", env=acme)
    assert got.returncode == 0, got.stdout + got.stderr
    run = got.json()["run"]
    assert (run["runId"], run["workspaceId"], run["state"]) == ("acme-run", "acme", "RUN_STATE_DONE")

    # Another workspace's run does not exist for this caller.
    other = run_ts("probe.ts", "get-run", "acme-run", env={**target, "MACHINA_API_KEY": GLOBEX_KEY})
    assert other.returncode == 1
    assert_failure(other.json(), "NOT_FOUND", "ERR_RUN_NOT_FOUND", {"run_id": "acme-run"})
    listed = run_ts("probe.ts", "list-runs", env={**target, "MACHINA_API_KEY": GLOBEX_KEY})
    assert listed.json() == {"ok": True, "runs": []}

    for env in ({**target, "MACHINA_API_KEY": "sk-wrong-key-000000"}, target):
        denied = run_ts("probe.ts", "list-runs", env=env)
        assert denied.returncode == 1
        assert_failure(denied.json(), "UNAUTHENTICATED", "ERR_UNAUTHENTICATED")

    # The example itself exits non-zero and says why.
    refused = run_ts("main.ts", env={**target, "MACHINA_API_KEY": "sk-wrong-key-000000"})
    assert refused.returncode == 1
    assert "error: UNAUTHENTICATED ERR_UNAUTHENTICATED" in refused.stderr


def assert_failure(
    doc: dict[str, Any], code: str, reason: str, metadata: dict[str, str] | None = None
) -> None:
    assert doc["ok"] is False
    assert (doc["code"], doc["reason"], doc["domain"]) == (code, reason, "machina.dev"), doc
    if metadata is not None:
        assert doc["metadata"] == metadata


def buf_curl(
    engine: EngineProcess, method: str, body: dict[str, Any], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(BUF),
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "--data",
            json.dumps(body),
            f"http://{engine.target}/machina.engine.v1.EngineService/{method}",
        ],
        # Nowhere near proto/ or buf.yaml: the schema can only come from server reflection.
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.slow
def test_buf_curl_with_server_reflection_only(engine: EngineProcess, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = buf_curl(engine, "GetRun", {"run_id": "no-such-run"}, empty)
    assert missing.returncode != 0
    error = json.loads(missing.stderr)
    assert error["code"] == "not_found"
    [detail] = error["details"]
    assert detail["type"] == "google.rpc.ErrorInfo"
    info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(detail["value"] + "=="))
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "ERR_RUN_NOT_FOUND",
        "machina.dev",
        {"run_id": "no-such-run"},
    )

    spec = {
        "task": "say hello",
        "run_id": "curl-run",
        "model": {"provider": "scripted", "script": [{"text": "Hello from buf curl."}]},
        "labels": {"caller": "buf-curl"},
    }
    created = buf_curl(engine, "CreateRun", {"spec": spec}, empty)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["run"]["runId"] == "curl-run"
    waited = buf_curl(engine, "WaitRun", {"run_id": "curl-run", "timeout_ms": 20000}, empty)
    assert json.loads(waited.stdout)["run"]["data"] == "Hello from buf curl."
    listed = buf_curl(engine, "ListRuns", {"labels": {"caller": "buf-curl"}}, empty)
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)["runs"]
    assert [(r["runId"], r["state"]) for r in runs] == [("curl-run", "RUN_STATE_DONE")]


# --- The reference page and the error codes -------------------------------------------------


@pytest.mark.slow
def test_api_reference_is_current() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_api_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_every_error_code_in_the_code_is_documented() -> None:
    """docs/errors.toml (rendered into docs/api.md) lists every code the engine and runner use."""
    documented = set()
    for section in tomllib.loads((ROOT / "docs" / "errors.toml").read_text()).values():
        documented |= {entry.get("reason") or entry["code"] for entry in section}
    used = set()
    for package in ("engine_service", "runner_service"):
        for path in (ROOT / package).rglob("*.py"):
            # A code starts a string literal: "ERR_X", or f"ERR_X: ..." for tool error results.
            used |= set(re.findall(r"""(?<=["'])(ERR_[A-Z]+(?:_[A-Z]+)*)\b""", path.read_text()))
    missing = sorted(used - documented)
    assert not missing, f"add these to docs/errors.toml, then run `just gen-docs`: {missing}"
    stale = sorted(c for c in documented - used if c.startswith("ERR_"))
    assert not stale, f"docs/errors.toml lists codes nothing uses any more: {stale}"


def test_readme_points_to_the_reference_for_errors() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docs/api.md" in readme
    # One source of truth: the reasons table lives in docs/api.md only.
    assert "| `ERR_INVALID_ID` |" not in readme


# --- buf breaking -------------------------------------------------------------------------

PROTO_V1 = """syntax = "proto3";

package demo.v1;

// A thing.
message Thing {
  // Its name.
  string name = 1;
  // Its size.
  int32 size = 2;
}
"""


GIT_IDENTITY = ["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *GIT_IDENTITY, *args], cwd=repo, check=True, capture_output=True)


def breaking(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "buf_breaking.py"), "--repo", str(repo), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_buf_breaking_checks_the_newest_proto_change(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "proto" / "demo" / "v1").mkdir(parents=True)
    (repo / "buf.yaml").write_text((ROOT / "buf.yaml").read_text())
    thing = repo / "proto" / "demo" / "v1" / "thing.proto"
    thing.write_text(PROTO_V1)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")

    first = breaking(repo)
    assert first.returncode == 0, first.stderr
    assert "skipped: no commit before" in first.stdout  # a first commit has nothing to break

    # An additive change passes...
    thing.write_text(PROTO_V1.replace("}\n", "  // Its colour.\n  string colour = 3;\n}\n"))
    uncommitted = breaking(repo)
    assert uncommitted.returncode == 0, uncommitted.stdout + uncommitted.stderr
    assert "uncommitted changes" in uncommitted.stdout
    git(repo, "commit", "-q", "-am", "add colour")
    (repo / "README").write_text("unrelated\n")
    git(repo, "add", "README")
    git(repo, "commit", "-q", "-m", "unrelated")
    assert breaking(repo).returncode == 0

    # ...a removed field does not, committed or not, even with later commits on top.
    thing.write_text(thing.read_text().replace("  // Its size.\n  int32 size = 2;\n", ""))
    assert breaking(repo).returncode != 0
    git(repo, "commit", "-q", "-am", "drop size")
    (repo / "README").write_text("still unrelated\n")
    git(repo, "commit", "-q", "-am", "unrelated again")
    broken = breaking(repo)
    assert broken.returncode != 0
    assert "size" in broken.stdout + broken.stderr
    # An explicit ref works too.
    assert breaking(repo, "HEAD").returncode == 0


@pytest.mark.slow
def test_buf_breaking_skips_without_git_history(tmp_path: Path) -> None:
    result = breaking(tmp_path)
    assert result.returncode == 0
    assert "skipped: not a git work tree" in result.stdout
