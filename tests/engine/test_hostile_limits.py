"""Tenants and models cannot stall the engine or break a workspace.

Three classes of hostile input, each attacked with a corpus through the public surface (gRPC
against a real server, the runner's HTTP shim against a real runner process):

- catastrophic regular expressions (tenant ``allowed_paths``, tool and output schemas; the model's
  ``Grep``/``Glob``): linear-time RE2, or a clear refusal for what RE2 will not run — and a real
  engine process keeps answering health checks while the worst input runs;
- values nested too deep, in every structured field a request carries, in a model's final answer
  and in the shim's body: refused at the edge, and a stored run that cannot be rendered is answered
  degraded instead of failing the calls that show it;
- validation at the door: limits that are NaN, infinite or negative, enum values the API does not
  define, a ``request_id`` reused for a different request, ``tool_choice: none`` ignored by the model.

Under Python's backtracking ``re`` each catastrophic case here takes hours (``(a+)+$`` doubles per
character, and the inputs have 40 of them), so a test that finishes within its timeout proves the
match is linear; none of them times anything.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client_py import AsyncEngineClient, InvalidRequestError, ToolCallCompleted
from engine_service.api._server import RunningServer
from engine_service.core._limits import MAX_DEPTH, MAX_SCHEMA_BYTES
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from machina.engine.v1 import run_pb2 as rp
from tests.conftest import ServerFactory, turn
from tests.grpc_errors import error_info
from tests.processes import EngineProcess, RunnerProcess
from tests.sse_server import Sse, data, serve

EVIL = "a" * 40 + "!"
# Patterns RE2 runs in linear time that backtrack exponentially (or polynomially) in `re`.
CATASTROPHIC = [
    r"(a+)+$",
    r"^(a+)+$",
    r"(a|a)*$",
    r"(a|aa)+$",
    r"(.*a){20}$",
    r"(a*)*$",
    r"((a+)+)+$",
    r"(a|a?)+$",
    r"(\w+\s?)+$",
    r"([a-z]+)*[0-9]$",
    r"(.*)*b",
    r"(a+){2,}$",
]
# Patterns RE2 refuses: backreferences, lookaround, atomic groups, possessive quantifiers.
UNSUPPORTED = [r"(a)\1", r"(a+)+\1", r"(?=a)a", r"(?!b)a", r"(?<=a)b", r"(?<!a)b", r"(?>a+)b", r"a++b"]
# Too big to build: refused, not compiled into a program of gigabytes.
TOO_BIG = [r"(((a{100}){100}){100})", r"a{1001}"]


@pytest.fixture
async def server(servers: ServerFactory) -> RunningServer:
    # Per-run ApiCall services here point at loopback: allowed, as an operator would, so what is
    # tested is the patterns and limits, not the egress policy.
    config = {"tools": {"permissions": {"double": "ask"}}, "egress_allow_hosts": ["127.0.0.1"]}
    return await servers.start(config=config)


@pytest.fixture
async def stub(server: RunningServer) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield svc_grpc.EngineServiceStub(channel)


def struct(doc: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(doc)
    return out


def nested(levels: int, leaf: Any = 1) -> Any:
    """A list nested ``levels`` deep: [[[...leaf...]]]."""
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


def nested_object(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


async def rpc_error(call: Any) -> tuple[grpc.StatusCode, str, str]:
    """(status, reason, message) of a call (unary or streaming) that must fail with a clean status."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _drain(call)
    exc = caught.value
    return exc.code(), error_info(exc).reason, exc.details() or ""


async def _drain(call: Any) -> None:
    if hasattr(call, "__aiter__"):
        async for _ in call:
            pass
    else:
        await call


# -- 1. catastrophic regular expressions ----------------------------------------------------------


def api_spec(patterns: list[str], base_url: str = "http://127.0.0.1:9") -> dict[str, Any]:
    return {"services": [{"name": "svc", "base_url": base_url, "allowed_paths": patterns}]}


@pytest.mark.timeout(60)
async def test_catastrophic_allowed_paths_match_in_linear_time(client: AsyncEngineClient) -> None:
    calls = [("ApiCall", {"service": "svc", "method": "GET", "path": f"/{EVIL}"})]
    handle = await client.create(
        "call the api",
        api=api_spec([f"/{p}" for p in CATASTROPHIC]),
        script=[turn("", *calls), turn("done")],
    )
    run = await handle.wait(timeout=30)
    assert run.state == "DONE", run
    results = [e async for e in handle.events() if isinstance(e, ToolCallCompleted)]
    assert results[0].is_error
    assert "is not allowed" in results[0].output


@pytest.mark.parametrize("pattern", UNSUPPORTED + TOO_BIG)
async def test_allowed_paths_re2_refuses_are_invalid_argument(stub: Any, pattern: str) -> None:
    spec = svc.RunSpec(
        task="t",
        model=svc.ModelSpec(provider="scripted", script=[svc.ScriptedTurn(text="ok")]),
        api=svc.ApiSpec(
            services=[svc.ApiService(name="svc", base_url="http://127.0.0.1:9", allowed_paths=[pattern])]
        ),
    )
    code, reason, message = await rpc_error(stub.CreateRun(svc.CreateRunRequest(spec=spec)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_REQUEST")
    assert "RE2" in message or "limit" in message, message


async def test_allowed_paths_still_match_what_they_allow(client: AsyncEngineClient, httpbin: str) -> None:
    handle = await client.create(
        "call",
        api=api_spec([r"/anything/(a+)+", r"/status/\d+"], httpbin),
        script=[turn("", ("ApiCall", {"service": "svc", "method": "GET", "path": "/anything/aaa"})), "ok"],
    )
    assert (await handle.wait(timeout=30)).state == "DONE"
    results = [e async for e in handle.events() if isinstance(e, ToolCallCompleted)]
    assert not results[0].is_error, results[0].output
    assert json.loads(results[0].output)["status"] == 200


@pytest.mark.timeout(60)
async def test_catastrophic_grep_and_glob_over_model_written_files(client: AsyncEngineClient) -> None:
    lines = "\n".join([EVIL] * 50)
    script: list[Any] = [
        turn("", ("Write", {"path": "evil.txt", "content": lines})),
        turn("", ("Write", {"path": f"{'a' * 200}.txt", "content": "x"})),
    ]
    script += [turn("", ("Grep", {"pattern": p})) for p in CATASTROPHIC]
    script += [turn("", ("Grep", {"pattern": p, "ignore_case": True})) for p in CATASTROPHIC[:3]]
    script += [turn("", ("Grep", {"pattern": p})) for p in UNSUPPORTED]
    # Globs that backtrack polynomially as regexes, on a 200-character name; and the name filter.
    script += [turn("", ("Glob", {"pattern": "*a" * 12 + "b"})), turn("", ("Glob", {"pattern": "*a*a*[!.]"}))]
    script += [turn("", ("Grep", {"pattern": "x", "glob": "*a" * 12 + "b"}))]
    script.append(turn("done"))
    handle = await client.create("grep", script=script, max_turns=100)
    run = await handle.wait(timeout=50)
    assert run.state == "DONE", run
    results = [e async for e in handle.events() if isinstance(e, ToolCallCompleted)]
    greps = results[2 : 2 + len(CATASTROPHIC) + 3]
    assert len(greps) == len(CATASTROPHIC) + 3
    assert not any(r.is_error for r in greps), greps
    refused = results[2 + len(CATASTROPHIC) + 3 : 2 + len(CATASTROPHIC) + 3 + len(UNSUPPORTED)]
    assert all(r.is_error and "RE2" in r.output for r in refused), refused
    globs = results[-3:]
    assert [r.output for r in globs] == ["no files match", "a" * 200 + ".txt", "no matches"]


@pytest.mark.parametrize("where", ["output_schema", "client tool", "patternProperties", "propertyNames"])
@pytest.mark.parametrize("pattern", UNSUPPORTED[:4])
async def test_schema_patterns_re2_refuses_are_invalid_argument(stub: Any, where: str, pattern: str) -> None:
    schema: dict[str, Any] = {
        "output_schema": {"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}},
        "client tool": {"type": "object", "properties": {"s": {"pattern": pattern}}},
        "patternProperties": {"type": "object", "patternProperties": {pattern: {}}},
        "propertyNames": {"type": "object", "propertyNames": {"pattern": pattern}},
    }[where]
    spec = svc.RunSpec(
        task="t", model=svc.ModelSpec(provider="scripted", script=[svc.ScriptedTurn(text="{}")])
    )
    if where == "client tool":
        spec.client_tools.append(svc.ToolDefinition(name="lookup", input_schema=struct(schema)))
    else:
        spec.output_schema.CopyFrom(struct(schema))
    code, reason, message = await rpc_error(stub.CreateRun(svc.CreateRunRequest(spec=spec)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_REQUEST")
    assert "RE2" in message, message


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"p": {"$schema": "http://json-schema.org/draft-07/schema#"}}},
        {"type": "object", "patternProperties": {"a": {}}, "unevaluatedProperties": False},
    ],
    ids=["nested draft-07", "unevaluatedProperties with patternProperties"],
)
async def test_schemas_that_would_reach_backtracking_re_are_refused(
    stub: Any, schema: dict[str, Any]
) -> None:
    spec = svc.RunSpec(
        task="t",
        model=svc.ModelSpec(provider="scripted", script=[svc.ScriptedTurn(text="{}")]),
        output_schema=struct(schema),
    )
    code, reason, _ = await rpc_error(stub.CreateRun(svc.CreateRunRequest(spec=spec)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_REQUEST")


@pytest.mark.timeout(60)
async def test_catastrophic_schema_patterns_validate_in_linear_time(client: AsyncEngineClient) -> None:
    properties = {f"p{i}": {"type": "string", "pattern": p} for i, p in enumerate(CATASTROPHIC)}
    tool_schema = {"type": "object", "properties": properties}
    output_schema = {
        "type": "object",
        "properties": properties,
        "patternProperties": {p: {"type": "string"} for p in CATASTROPHIC},
        "additionalProperties": False,
    }
    answer = json.dumps({**{f"p{i}": EVIL for i in range(len(CATASTROPHIC))}, EVIL: EVIL})
    handle = await client.create(
        "schemas",
        client_tools=[{"name": "lookup", "description": "d", "input_schema": tool_schema}],
        output_schema=output_schema,
        script=[turn("", ("lookup", {f"p{i}": EVIL for i in range(len(CATASTROPHIC))})), answer, answer],
    )
    run = await handle.wait(timeout=30)
    # The tool call's arguments fail their patterns (an error result, never a pause)...
    results = [e async for e in handle.events() if isinstance(e, ToolCallCompleted)]
    assert {e.outcome for e in results} == {"invalid_arguments"}  # resolved at once: no call ran
    # ...and so does the answer, twice: ERR_OUTPUT_SCHEMA.
    assert run.state == "FAILED", run
    assert run.error is not None
    assert run.error.code == "ERR_OUTPUT_SCHEMA"
    assert "does not match" in run.error.message


def _big_workdir(root: Path, run_id: str) -> None:
    """Files for a Grep that takes a while even in linear time: 48 MB of lines of a's."""
    work = root / "default" / run_id
    work.mkdir(parents=True)
    block = ("a" * 200 + "\n") * 24_000  # 4.8 MB
    for i in range(10):
        (work / f"f{i}.txt").write_text(block)


async def _health_while(client: AsyncEngineClient, health: Any, task: str, **options: Any) -> Any:
    """Start a run and send health checks until it ends; every one must be answered."""
    handle = await client.create(task, **options)
    answered = 0
    while (await handle.refresh()).state not in ("DONE", "FAILED"):
        # A generous deadline: a loop blocked by backtracking would miss it by hours.
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        answered += 1
        await asyncio.sleep(0.01)
    assert answered >= 1
    return await handle.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_real_engine_answers_health_checks_while_the_worst_input_runs(tmp_path: Path) -> None:
    work = tmp_path / "work"
    _big_workdir(work, "run-grep")
    engine = EngineProcess(
        tmp_path, env={"MACHINA_STORAGE": str(tmp_path / "storage"), "MACHINA_WORKDIR_ROOT": str(work)}
    )
    try:
        async with AsyncEngineClient(engine.target) as client, grpc.aio.insecure_channel(engine.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            # Grep of 48 MB with catastrophic patterns.
            script = [turn("", ("Grep", {"pattern": p})) for p in (r"(a+)+!$", r"(a|aa)+!$", r"(.*a){20}!")]
            run = await _health_while(client, health, "grep", run_id="run-grep", script=[*script, "done"])
            assert run.state == "DONE", run
            # Megabytes of tool arguments checked against a schema's patterns (each item fails).
            items = {"type": "array", "items": {"type": "string", "pattern": r"^(a+)+$"}}
            tool = {"name": "lookup", "description": "d", "input_schema": {"properties": {"xs": items}}}
            call = ("lookup", {"xs": [EVIL] * 60_000})
            run = await _health_while(
                client, health, "args", client_tools=[tool], script=[turn("", call), "ok"]
            )
            assert run.state == "DONE", run
            # A structured answer of megabytes checked against the same patterns (each item matches).
            answer = json.dumps(["a" * 40] * 60_000)
            run = await _health_while(client, health, "answer", output_schema=items, script=[answer])
            assert run.state == "DONE", run
            assert len(run.data) == 60_000
    finally:
        engine.close()


# -- 2. depth and size limits ---------------------------------------------------------------------

TOO_DEEP = MAX_DEPTH + 1
DEEP_FIELDS = [
    "script arguments",
    "output_schema",
    "client tool input_schema",
    "edited arguments",
    "respond output",
]


async def paused_for_approval(client: AsyncEngineClient) -> Any:
    handle = await client.create("d", script=[turn("", ("double", {"x": 2})), turn("4")])
    return await handle.wait(timeout=10)


async def deep_request(stub: Any, client: AsyncEngineClient, where: str, doc: Any) -> Any:
    spec = svc.RunSpec(
        task="t", model=svc.ModelSpec(provider="scripted", script=[svc.ScriptedTurn(text="{}")])
    )
    if where == "script arguments":
        spec.model.script.insert(0, svc.ScriptedTurn(tool_calls=[svc.ScriptedToolCall(name="noop")]))
        spec.model.script[0].tool_calls[0].arguments.update({"a": doc})
    elif where == "output_schema":
        spec.output_schema.update({"default": doc})
    elif where == "client tool input_schema":
        spec.client_tools.append(svc.ToolDefinition(name="lookup", input_schema=struct({"default": doc})))
    else:
        run = await paused_for_approval(client)
        decision = svc.Decision(interrupt_id=run.interrupts[0].interrupt_id)
        if where == "edited arguments":
            decision.approve.edited_arguments.update({"x": doc})
        else:
            decision.respond.output.list_value.append(doc)
        return stub.ResumeRun(svc.ResumeRunRequest(run_id=run.run_id, decisions=[decision]))
    return stub.CreateRun(svc.CreateRunRequest(spec=spec))


@pytest.mark.parametrize("where", DEEP_FIELDS)
@pytest.mark.parametrize("shape", ["list", "object"])
async def test_deep_values_in_every_request_struct_are_refused(
    stub: Any, client: AsyncEngineClient, where: str, shape: str
) -> None:
    doc = nested(TOO_DEEP) if shape == "list" else nested_object(TOO_DEEP)
    code, reason, message = await rpc_error(await deep_request(stub, client, where, doc))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ERR_VALUE_TOO_DEEP"), message
    assert str(MAX_DEPTH) in message
    # (Deeper than protobuf parses at all is refused before any of this code: see
    # tests/engine/test_hostile_input.py::test_malformed_protobuf_is_invalid_argument.)


@pytest.mark.parametrize("where", ["output_schema", "client tool input_schema"])
async def test_schemas_over_the_size_limit_are_refused(stub: Any, where: str) -> None:
    schema = struct({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}})
    assert schema.ByteSize() > MAX_SCHEMA_BYTES
    spec = base_spec()
    if where == "output_schema":
        spec.output_schema.CopyFrom(schema)
    else:
        spec.client_tools.append(svc.ToolDefinition(name="lookup", input_schema=schema))
    code, reason, message = await rpc_error(stub.CreateRun(svc.CreateRunRequest(spec=spec)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ERR_VALUE_TOO_LARGE"), message


async def test_the_limit_itself_is_accepted(client: AsyncEngineClient) -> None:
    # {"a": <value MAX_DEPTH - 1 deep>} is the deepest value a request may carry.
    handle = await client.create("ok", script=[turn("", ("noop", {"a": nested(MAX_DEPTH - 1)})), "done"])
    assert (await handle.wait(timeout=10)).state == "DONE"


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 50, 400])
async def test_a_deep_final_answer_fails_validation_and_breaks_nothing(
    client: AsyncEngineClient, stub: Any, depth: int
) -> None:
    answer = json.dumps(nested(depth))
    handle = await client.create("deep", output_schema={"type": "array"}, script=[answer, answer])
    run = await handle.wait(timeout=10)
    assert run.state == "FAILED"
    assert run.error is not None
    assert run.error.code == "ERR_OUTPUT_SCHEMA"
    assert f"nested deeper than {MAX_DEPTH}" in run.error.message
    assert [e async for e in handle.events()]
    assert [r.run_id async for r in client.list_runs()] == [run.run_id]
    await stub.GetRun(svc.GetRunRequest(run_id=run.run_id))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("depth", [40, 2000])
async def test_deep_tool_arguments_from_a_model_are_an_error_result_and_break_nothing(
    servers: ServerFactory, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    """A provider's tool call (an OpenAI-format server on loopback) with arguments nested too deep."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    arguments = '{"text": ' + "[" * depth + "1" + "]" * depth + "}"
    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "echo", "arguments": arguments},
    }
    frames = [
        data({"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}),
        data({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        data("[DONE]"),
    ]
    done = [
        data({"choices": [{"index": 0, "delta": {"content": "done"}, "finish_reason": None}]}),
        data({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        data("[DONE]"),
    ]
    with serve() as fake:
        fake.push(Sse(frames), Sse(done))
        srv = await servers.start(
            config={"model": {"provider": "openai", "base_url": fake.url + "/v1", "max_attempts": 1}}
        )
        async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
            handle = await client.create("echo it")
            run = await handle.wait(timeout=20)
            events = [e async for e in handle.events()]  # the stream renders
            # On the record, never run.
            assert [e.outcome for e in events if isinstance(e, ToolCallCompleted)] == ["invalid_arguments"]
            assert [r.run_id async for r in client.list_runs()] == [run.run_id]
        assert run.state == "DONE", run
        # The model was told why: its second request carries the error result. (Past what the JSON
        # decoder holds, the arguments arrive as unparsed text instead.)
        tool_message = fake.requests[1].body["messages"][-1]
        assert "Invalid arguments for echo" in tool_message["content"]
        if depth < 100:
            assert f"nested deeper than {MAX_DEPTH}" in tool_message["content"]


async def test_a_stored_run_that_cannot_be_rendered_is_degraded_not_fatal(
    servers: ServerFactory, server: RunningServer, client: AsyncEngineClient, stub: Any
) -> None:
    """A run whose stored answer protobuf cannot carry (e.g. stored before the limit existed):
    GetRun, StreamRunEvents and every ListRuns page still answer, that run degraded."""
    good = await client.create("good", script=["fine"])
    bad = await client.create("bad", output_schema={"type": "array"}, script=["[1]"])
    assert (await bad.wait(timeout=10)).state == "DONE"
    assert (await good.wait(timeout=10)).state == "DONE"
    storage = server.engine.storage
    state = await storage.read_state("default", bad.run_id)
    assert state is not None
    state["data"] = nested(50)
    await storage.write_state("default", bad.run_id, state)
    # And its event log, as written on disk (LocalStorage: one JSON document per line).
    events_dir = servers.root / "workspaces" / "default" / "runs" / bad.run_id / "events"
    for segment in events_dir.iterdir():
        lines = segment.read_text().splitlines()
        docs = [json.loads(line) for line in lines]
        for doc in docs:
            if doc["k"] == "run_finished":
                doc["d"]["data"] = nested(50)
        segment.write_text("".join(json.dumps(doc) + "\n" for doc in docs))

    got = await stub.GetRun(svc.GetRunRequest(run_id=bad.run_id))
    assert got.run.state == rp.RUN_STATE_DONE
    assert "omitted" in got.run.data.string_value
    listed = await stub.ListRuns(svc.ListRunsRequest())
    assert {r.run_id for r in listed.runs} == {good.run_id, bad.run_id}
    async for response in stub.StreamRunEvents(svc.StreamRunEventsRequest(run_id=bad.run_id)):
        for event in response.events:
            if event.HasField("run_finished"):
                assert "omitted" in event.run_finished.data.string_value
    run = await client.get_run(bad.run_id)  # the client renders it too
    assert run.state == "DONE"


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    tmp = tmp_path_factory.mktemp("trust-runner")
    process = RunnerProcess(
        tmp,
        env={
            "MACHINA_RUNNER_SECRET": "runner-secret-trust-0c1d",
            "MACHINA_STORAGE": str(tmp / "storage"),
            "MACHINA_WORKDIR_ROOT": str(tmp / "work"),
        },
    )
    yield process
    process.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "body",
    [
        b"[" * 4096,
        b"[" * 4096 + b"]" * 4096,
        b'{"a":' * 2000 + b"1" + b"}" * 2000,
        json.dumps({"runId": nested(40)}).encode(),
        json.dumps({"runId": "r1", "extra": nested_object(MAX_DEPTH + 1)}).encode(),
        b"[" * 100_000,
    ],
    ids=["4 KB of [", "balanced brackets", "nested objects", "deep runId", "deep extra field", "100 KB of ["],
)
def test_the_runner_shim_answers_deep_bodies_400(runner: RunnerProcess, body: bytes) -> None:
    response = httpx.post(
        f"{runner.http}/continue",
        content=body,
        headers={"authorization": "Bearer runner-secret-trust-0c1d", "content-type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] in ("ERR_VALUE_TOO_DEEP", "ERR_BODY_TOO_LARGE")
    assert "Traceback" not in response.text
    assert httpx.get(f"{runner.http}/health", timeout=5).status_code == 200


# -- 3. validation at the door --------------------------------------------------------------------


def base_spec() -> svc.RunSpec:
    return svc.RunSpec(
        task="t", model=svc.ModelSpec(provider="scripted", script=[svc.ScriptedTurn(text="ok")])
    )


def _set(spec: svc.RunSpec, path: str, value: Any) -> None:
    *parents, name = path.split(".")
    target: Any = spec
    for parent in parents:
        target = getattr(target, parent)
    setattr(target, name, value)


LIMITS: dict[str, list[float]] = {
    "limits.max_cost_usd": [math.nan, math.inf, -math.inf, -0.01],
    "limits.max_turns": [-1],
    "limits.max_tokens": [-1],
    "limits.timeout_ms": [-1],
    "approval_timeout_ms": [-1],
    "model.max_output_tokens": [-1],
}
LIMIT_CASES = [(field, v) for field, values in LIMITS.items() for v in values]


@pytest.mark.parametrize(("field", "number"), LIMIT_CASES, ids=[f"{f}={v}" for f, v in LIMIT_CASES])
async def test_limits_that_are_nan_infinite_or_negative_are_refused(
    stub: Any, field: str, number: float
) -> None:
    spec = base_spec()
    _set(spec, field, number)
    for call in (
        stub.CreateRun(svc.CreateRunRequest(spec=spec)),
        stub.ExecuteRun(svc.ExecuteRunRequest(spec=spec)),
    ):
        code, reason, _ = await rpc_error(call)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_REQUEST")


@pytest.mark.parametrize("field", ["max_body_bytes", "max_response_bytes", "timeout_ms"])
async def test_negative_api_service_limits_are_refused(stub: Any, field: str) -> None:
    spec = base_spec()
    service = svc.ApiService(name="s", base_url="http://127.0.0.1:9")
    setattr(service, field, -1)
    spec.api.services.append(service)
    code, reason, _ = await rpc_error(stub.CreateRun(svc.CreateRunRequest(spec=spec)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_REQUEST")


async def test_negative_scripted_usage_and_read_limits_are_refused(
    stub: Any, client: AsyncEngineClient
) -> None:
    spec = base_spec()
    spec.model.script[0].usage.input_tokens = -5
    code, reason, _ = await rpc_error(stub.CreateRun(svc.CreateRunRequest(spec=spec)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_SCRIPT")
    run = (await client.create("x", script=["ok"])).run_id
    for call in (
        stub.WaitRun(svc.WaitRunRequest(run_id=run, timeout_ms=-1)),
        stub.GetToolResult(svc.GetToolResultRequest(run_id=run, call_id="c", offset=-1)),
        stub.GetToolResult(svc.GetToolResultRequest(run_id=run, call_id="c", limit=-1)),
        stub.StreamRunEvents(svc.StreamRunEventsRequest(run_id=run, after_seq=-1)),
        stub.ListRuns(svc.ListRunsRequest(page_size=-1)),
    ):
        code, _, _ = await rpc_error(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT


ENUMS = ["tool_choice", "approval_expiry_action", "permissions", "list states"]


@pytest.mark.parametrize("where", ENUMS)
@pytest.mark.parametrize("offset", ["next", 99, -1, 2**31 - 1])
async def test_enum_values_the_api_does_not_define_are_refused(stub: Any, where: str, offset: Any) -> None:
    enum = {
        "tool_choice": rp.ToolChoice,
        "approval_expiry_action": rp.ExpiryAction,
        "permissions": rp.Permission,
        "list states": rp.RunState,
    }[where]
    number = max(enum.values()) + 1 if offset == "next" else offset
    spec = base_spec()
    if where == "tool_choice":
        spec.tool_choice = number  # type: ignore[assignment]
    elif where == "approval_expiry_action":
        spec.approval_expiry_action = number  # type: ignore[assignment]
    elif where == "permissions":
        spec.permissions["noop"] = number  # type: ignore[assignment]
    else:
        call = stub.ListRuns(svc.ListRunsRequest(states=[number]))  # type: ignore[list-item]
        code, reason, _ = await rpc_error(call)
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_REQUEST")
        return
    code, reason, _ = await rpc_error(stub.CreateRun(svc.CreateRunRequest(spec=spec)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ERR_INVALID_REQUEST")


async def test_a_request_id_reused_for_another_start_is_refused(stub: Any) -> None:
    spec = base_spec()
    spec.request_id = "req-1"
    first = await stub.CreateRun(svc.CreateRunRequest(spec=spec))
    retry = await stub.CreateRun(svc.CreateRunRequest(spec=spec))
    assert retry.run.run_id == first.run.run_id
    # ExecuteRun with the same request is the same start.
    responses = [r async for r in stub.ExecuteRun(svc.ExecuteRunRequest(spec=spec))]
    assert responses[-1].run.run_id == first.run.run_id
    for change in ("task", "labels", "limits.max_turns", "tool_choice"):
        other = svc.RunSpec()
        other.CopyFrom(spec)
        if change == "task":
            other.task = "something else"
        elif change == "labels":
            other.labels["k"] = "v"
        elif change == "limits.max_turns":
            other.limits.max_turns = 3
        else:
            other.tool_choice = rp.TOOL_CHOICE_NONE
        for call in (
            stub.CreateRun(svc.CreateRunRequest(spec=other)),
            stub.ExecuteRun(svc.ExecuteRunRequest(spec=other)),
        ):
            code, reason, _ = await rpc_error(call)
            assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ERR_REQUEST_ID_REUSED")
    listed = await stub.ListRuns(svc.ListRunsRequest())
    assert [r.run_id for r in listed.runs] == [first.run.run_id]


async def test_a_request_id_reused_for_another_resume_is_refused(
    stub: Any, client: AsyncEngineClient
) -> None:
    handle = await client.create(
        "two", script=[turn("", ("double", {"x": 2}), ("double", {"x": 3})), turn("done")]
    )
    run = await handle.wait(timeout=10)
    first, second = (i.interrupt_id for i in run.interrupts)
    approve = svc.Decision(interrupt_id=first, approve=svc.Approve())
    await stub.ResumeRun(svc.ResumeRunRequest(run_id=run.run_id, decisions=[approve], request_id="res-1"))
    again = await stub.ResumeRun(
        svc.ResumeRunRequest(run_id=run.run_id, decisions=[approve], request_id="res-1")
    )
    assert again.run.run_id == run.run_id
    for decision in (
        svc.Decision(interrupt_id=first, reject=svc.Reject(reason="no")),
        svc.Decision(interrupt_id=second, approve=svc.Approve()),
    ):
        call = stub.ResumeRun(
            svc.ResumeRunRequest(run_id=run.run_id, decisions=[decision], request_id="res-1")
        )
        code, reason, _ = await rpc_error(call)
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ERR_REQUEST_ID_REUSED")
    # The second interrupt is still pending: nothing was applied under the reused id.
    assert [i.interrupt_id for i in (await handle.refresh()).interrupts] == [second]


async def test_tool_choice_none_never_runs_a_tool_the_model_calls_anyway(
    client: AsyncEngineClient, server: RunningServer
) -> None:
    handle = await client.create(
        "no tools",
        tool_choice="none",
        script=[turn("", ("Write", {"path": "x.txt", "content": "x"}), ("double", {"x": 2})), "done"],
    )
    run = await handle.wait(timeout=10)
    assert run.state == "DONE", run  # no approval asked for `double` either: the call was never planned
    outcomes = [e.outcome async for e in handle.events() if isinstance(e, ToolCallCompleted)]
    assert outcomes == ["denied", "denied"]  # on the record, never run
    workdir = Path(server.engine.config.workdir_root) / "default" / run.run_id
    assert not (workdir / "x.txt").exists()


async def test_the_client_maps_the_new_reasons(client: AsyncEngineClient) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await client.create("deep", script=[turn("", ("noop", {"a": nested(40)}))])
    assert caught.value.code == "ERR_VALUE_TOO_DEEP"


def test_a_custom_tool_whose_schema_re2_refuses_is_a_config_error() -> None:
    from engine_service import EngineError, ToolRegistry, tool

    @tool(input_schema={"type": "object", "properties": {"s": {"type": "string", "pattern": r"(a)\1"}}})
    def lookahead(args: dict[str, object], ctx: object) -> str:
        return "never"

    with pytest.raises(EngineError) as caught:
        ToolRegistry([lookahead])
    assert caught.value.code == "ERR_CONFIG"
    assert "RE2" in caught.value.message


async def test_a_webhook_body_never_carries_a_value_too_deep(tmp_path: Path, receiver: Any) -> None:
    # A run's own answer cannot get this deep (see above); this is the sender's last line.
    from engine_service import LocalStorage
    from engine_service.net._egress import EgressPolicy
    from engine_service.net._webhooks import WebhookSender

    loopback = EgressPolicy.from_settings(allow_hosts=["127.0.0.1"])  # the receiver's address
    sender = WebhookSender(LocalStorage(tmp_path), lambda _ws, _ref: None, egress=loopback)
    run = {"run_id": "run-1", "state": "DONE", "data": nested(50)}
    sender.notify("default", "run-1", {"url": receiver.url, "events": ["done"]}, "done", run)
    await receiver.wait_for(1)
    await sender.close()
    body = json.loads(receiver.requests[0][1])
    assert "omitted" in json.dumps(body)
    assert "[[[[[[" not in json.dumps(body)
