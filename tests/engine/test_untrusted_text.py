"""Lone UTF-16 surrogates from outside the engine never reach a transcript.

A JSON ``"\\ud83d"`` escape (half an emoji) decodes to a Python string that UTF-8 cannot
encode, so one such string in a transcript or event kills the run at its checkpoint.
``engine_service/core/_text.py`` cleans untrusted JSON and text where they enter the engine;
these tests check the functions, then each boundary through the public gRPC client:
model streams (OpenAI, Anthropic), provider error bodies, ApiCall, WebFetch, MCP, file
names, and gRPC input itself.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from client_py import AsyncEngineClient, ToolCallCompleted, ToolCallStarted
from engine_service.core._text import clean_text, clean_value, has_surrogate, loads_untrusted
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from tests.conftest import ROOT, ServerFactory, turn
from tests.mcp_servers.lone_surrogate import HEARD, SAID
from tests.sse_server import Sse, data, event, serve

pytestmark = pytest.mark.timeout(60)

EMOJI = "\U0001f600"  # 😀, "\ud83d\ude00" in UTF-16


def utf8_safe(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- the functions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("plain ascii", "plain ascii"),
        (f"an emoji {EMOJI} and é", f"an emoji {EMOJI} and é"),
        ("\ud83d\ude00", EMOJI),  # a pair as two code points is joined
        ("lone high \ud83d", "lone high \ufffd"),
        ("\ude00 lone low", "\ufffd lone low"),
        ("reversed \ude00\ud83d", "reversed \ufffd\ufffd"),
        ("\ud83d\ud83d\ude00", f"\ufffd{EMOJI}"),  # a high, then a whole pair
        (f"\ud83d{EMOJI}\udc00x", f"\ufffd{EMOJI}\ufffdx"),
        ("caf\udce9.txt", "caf\ufffd.txt"),  # surrogateescape: a file name that is not UTF-8
    ],
)
def test_clean_text(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean
    assert has_surrogate(raw) == any(0xD800 <= ord(c) <= 0xDFFF for c in raw)
    assert not has_surrogate(clean)


def test_clean_text_returns_clean_text_itself() -> None:
    for text in ["", "ascii", f"é {EMOJI} 你好"]:
        assert clean_text(text) is text
        assert not has_surrogate(text)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (r'"\ud83d\ude00"', EMOJI),  # an escaped pair is kept as the emoji
        (r'"\uD83D\uDE00"', EMOJI),
        (r'"hi \ud83d"', "hi \ufffd"),
        (r'"\udE00 hi"', "\ufffd hi"),
        (r'"\ude00\ud83d"', "\ufffd\ufffd"),
        (r'"a\ud83db\ud83d\ude00c\ude00d\ud83d"', f"a\ufffdb{EMOJI}c\ufffdd\ufffd"),
        (r'"\\ud83d is how JSON spells half an emoji"', r"\ud83d is how JSON spells half an emoji"),
        (r'"\\\ud83d"', "\\\ufffd"),  # an escaped backslash, then a lone surrogate
        ('"raw \ud83d"', "raw \ufffd"),  # text that a non-UTF-8 decoder gave a surrogate
        (r'"\u00e9\ud7ff\ue000"', "é\ud7ff\ue000"),  # neighbours of the surrogate range
    ],
)
def test_loads_untrusted_strings(raw: str, value: str) -> None:
    assert loads_untrusted(raw) == value


def test_loads_untrusted_cleans_keys_and_nested_values_and_keeps_the_rest() -> None:
    raw = (
        r'{"k\ud83d": [1, 2.5, true, false, null, "\ude00", {"deep": ["\ud83d\ude00", "\ud83d"]}],'
        r' "n": -3, "e": 1e3, "ok": "fine", "\ud83d\ude00": {}}'
    )
    assert loads_untrusted(raw) == {
        "k\ufffd": [1, 2.5, True, False, None, "\ufffd", {"deep": [EMOJI, "\ufffd"]}],
        "n": -3,
        "e": 1000.0,
        "ok": "fine",
        EMOJI: {},
    }
    assert loads_untrusted(r'["\ud83d", 1]') == ["\ufffd", 1]
    assert loads_untrusted("42") == 42
    assert loads_untrusted("null") is None


def test_loads_untrusted_raises_value_error_only() -> None:
    for bad in ["", "{", '{"a": }', "[" * 100_000 + "]" * 100_000]:
        with pytest.raises(ValueError, match=r"JSON|Expecting|char"):
            loads_untrusted(bad)


def test_loads_untrusted_without_surrogates_is_json_loads() -> None:
    raw = r'{"a": "\u00e9\n\"x\"", "b": [1, {"c": "\u4f60\u597d"}], "d": "EMOJI"}'.replace("EMOJI", EMOJI)
    assert loads_untrusted(raw) == json.loads(raw)


# Any code point, surrogates included (hypothesis leaves them out of text() by default).
_ANY_TEXT = st.lists(
    st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr), st.just(EMOJI), st.just("\\"))
).map("".join)
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _ANY_TEXT),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_JSON, st.booleans())
def test_any_json_decodes_to_utf8_safe_values(value: Any, ensure_ascii: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ensure_ascii)
    decoded = loads_untrusted(raw)
    assert utf8_safe(decoded)
    assert decoded == clean_value(value)
    if not has_surrogate(json.dumps(value, ensure_ascii=False)):
        assert decoded == value


# -- model streams ------------------------------------------------------------------------------------


async def test_openai_text_and_tool_arguments_with_lone_surrogates(
    servers: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")

    def call(function: dict[str, str], **fields: str) -> str:
        fragment = {"index": 0, **fields, "function": function}
        return data({"choices": [{"index": 0, "delta": {"tool_calls": [fragment]}, "finish_reason": None}]})

    def text(content: str) -> str:
        return data({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]})

    def finish(reason: str) -> str:
        return data({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})

    with serve() as fake:
        fake.push(
            Sse(
                [
                    text("calling \ud83d"),  # json.dumps writes it as the escape "\ud83d"
                    call({"name": "echo", "arguments": ""}, id="call_1"),
                    # The arguments are JSON inside JSON: an emoji cut between two fragments survives.
                    call({"arguments": '{"text": "\\ud83d'}),
                    call({"arguments": '\\ude00 then \\udc00"}'}),
                    finish("tool_calls"),
                    "data: [DONE]\n\n",
                ]
            ),
            Sse([text("done "), text("\ude00"), finish("stop"), "data: [DONE]\n\n"]),
        )
        srv = await servers.start(
            config={"model": {"provider": "openai", "base_url": fake.url + "/v1", "max_attempts": 1}}
        )
        async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
            handle = await client.create("echo something")
            run = await handle.wait(timeout=20)
            events = [e async for e in handle.events(follow=False)]
    assert run.state == "DONE", run
    assert run.data == "done \ufffd"
    (started,) = [e for e in events if isinstance(e, ToolCallStarted)]
    assert started.call.arguments == {"text": f"{EMOJI} then \ufffd"}
    (completed,) = [e for e in events if isinstance(e, ToolCallCompleted)]
    assert not completed.is_error
    assert completed.output == f"{EMOJI} then \ufffd"
    # The history sent back to the model is valid UTF-8 JSON with the replacement in it.
    (sent,) = [m for m in fake.requests[1].body["messages"] if m["role"] == "assistant"]
    assert sent["content"] == "calling \ufffd"


async def test_anthropic_text_and_tool_input_with_lone_surrogates(
    servers: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-not-a-real-key")
    start = event("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 3}}})
    stop = event("message_stop", {"type": "message_stop"})

    def delta(index: int, body: dict[str, Any]) -> str:
        return event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": body})

    def block(index: int, body: dict[str, Any]) -> str:
        return event(
            "content_block_start", {"type": "content_block_start", "index": index, "content_block": body}
        )

    def stop_reason(reason: str) -> str:
        return event("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason}})

    with serve() as fake:
        fake.push(
            Sse(
                [
                    start,
                    block(0, {"type": "text", "text": ""}),
                    delta(0, {"type": "text_delta", "text": "calling \ud83d"}),
                    block(1, {"type": "tool_use", "id": "toolu_1", "name": "echo", "input": {}}),
                    delta(1, {"type": "input_json_delta", "partial_json": '{"text": "\\ud83d'}),
                    delta(1, {"type": "input_json_delta", "partial_json": '\\ude00 then \\udc00"}'}),
                    stop_reason("tool_use"),
                    stop,
                ]
            ),
            Sse(
                [
                    start,
                    block(0, {"type": "text", "text": "done \ude00\ud83d"}),
                    stop_reason("end_turn"),
                    stop,
                ]
            ),
        )
        srv = await servers.start(
            config={"model": {"provider": "anthropic", "base_url": fake.url, "max_attempts": 1}}
        )
        async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
            handle = await client.create("echo something")
            run = await handle.wait(timeout=20)
            events = [e async for e in handle.events(follow=False)]
    assert run.state == "DONE", run
    assert run.data == "done \ufffd\ufffd"
    (completed,) = [e for e in events if isinstance(e, ToolCallCompleted)]
    assert not completed.is_error
    assert completed.output == f"{EMOJI} then \ufffd"
    (sent,) = [m for m in fake.requests[1].body["messages"] if m["role"] == "assistant"]
    assert sent["content"][0] == {"type": "text", "text": "calling \ufffd"}


async def test_a_stream_in_a_charset_that_decodes_to_surrogates_is_read_as_utf8(
    servers: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In UTF-7, "+2D0-" is a lone high surrogate; an event stream is UTF-8 whatever it says.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    chunk = {"choices": [{"index": 0, "delta": {"content": "a+2D0-b é"}, "finish_reason": "stop"}]}
    frames = [data(chunk), "data: [DONE]\n\n"]
    with serve() as fake:
        fake.push(Sse(frames, headers={"content-type": "text/event-stream; charset=utf-7"}))
        srv = await servers.start(
            config={"model": {"provider": "openai", "base_url": fake.url + "/v1", "max_attempts": 1}}
        )
        async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
            run = await (await client.create("hi")).wait(timeout=20)
    assert run.state == "DONE", run
    assert run.data == "a+2D0-b é"


async def test_a_structured_answer_with_a_lone_surrogate_escape_is_stored_with_u_fffd(
    servers: ServerFactory,
) -> None:
    try:
        srv = await servers.start()
        async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
            answer = turn('{"a": "\\ud83d", "b": "\\ud83d\\ude00"}')
            handle = await client.create(
                "t", model="scripted", script=[answer], output_schema={"type": "object"}
            )
            run = await handle.wait(timeout=5)  # a crashed run never ends
        assert run.state == "DONE", run
        assert run.data == {"a": "\ufffd", "b": EMOJI}
    finally:
        await servers.stop_all()
        gc.collect()


# -- raw HTTP: what JSON encoders refuse to write --------------------------------------------------------


class RawHttp:
    """A loopback HTTP server answering every request with the same status, headers and bytes."""

    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        def respond(handler: BaseHTTPRequestHandler) -> None:
            length = int(handler.headers.get("content-length") or 0)
            handler.rfile.read(length)
            handler.send_response(status)
            handler.send_header("content-type", content_type)
            handler.send_header("content-length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)

        class Handler(BaseHTTPRequestHandler):
            do_GET = do_POST = respond

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@contextmanager
def raw_http(status: int, content_type: str, body: bytes) -> Iterator[str]:
    raw = RawHttp(status, content_type, body)
    thread = threading.Thread(target=raw.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield raw.url
    finally:
        raw.server.shutdown()
        raw.server.server_close()
        thread.join(10)


async def run_script(
    servers: ServerFactory, config: dict[str, Any], *calls: tuple[str, dict[str, Any]]
) -> tuple[Any, list[ToolCallCompleted]]:
    """Run a scripted run making ``calls`` in turn, then answering "done"; (run, tool results)."""
    srv = await servers.start(config=config)
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
        script = [turn("", call) for call in calls] + [turn("done")]
        handle = await client.create("t", model="scripted", script=script)
        run = await handle.wait(timeout=30)
        events = [e async for e in handle.events(follow=False)]
    assert run.state == "DONE", run
    return run, [e for e in events if isinstance(e, ToolCallCompleted)]


async def test_a_provider_error_body_with_a_lone_surrogate_fails_the_run_cleanly(
    servers: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    body = rb'{"error": {"message": "no \ud83d here", "type": "invalid_request_error"}}'
    with raw_http(400, "application/json", body) as url:
        srv = await servers.start(
            config={"model": {"provider": "openai", "base_url": url + "/v1", "max_attempts": 1}}
        )
        async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
            handle = await client.create("hi")
            run = await handle.wait(timeout=20)
            events = [e async for e in handle.events(follow=False)]
    assert run.state == "FAILED", run
    assert run.error is not None
    assert "no \ufffd here" in run.error.message
    assert events[-1].kind == "run_finished"


async def test_an_api_call_answer_with_lone_surrogates_is_a_clean_result(servers: ServerFactory) -> None:
    body = rb'{"name": "half \ud83d", "whole": "\ud83d\ude00", "list": [1, "\udc00"], "k\ud83d": true}'
    with raw_http(200, "application/json; charset=utf-8", body) as url:
        config = {"api": {"services": [{"name": "raw", "base_url": url}]}}
        _, (result,) = await run_script(servers, config, ("ApiCall", {"service": "raw", "path": "/thing"}))
    assert not result.is_error, result.output
    assert json.loads(result.output)["body"] == {
        "name": "half \ufffd",
        "whole": EMOJI,
        "list": [1, "\ufffd"],
        "k\ufffd": True,
    }


@pytest.mark.parametrize(
    ("charset", "body", "shown"),
    [
        ("utf-7", b"a+2D0-b", "a\ufffdb"),
        ("unicode_escape", rb"x\ud83dy\ud83d\ude00z", f"x\ufffdy{EMOJI}z"),
        ("utf-8", rb"x\ud83d", r"x\ud83d"),  # text, not JSON: the escape is just text
    ],
)
async def test_web_fetch_of_a_page_whose_charset_decodes_to_surrogates(
    servers: ServerFactory, charset: str, body: bytes, shown: str
) -> None:
    with raw_http(200, f"text/plain; charset={charset}", body) as url:
        config = {"tools": {"webfetch_allow_private": True}}
        _, (result,) = await run_script(servers, config, ("WebFetch", {"url": url + "/page"}))
    assert not result.is_error, result.output
    assert result.output.endswith("\n\n" + shown)


async def test_file_names_that_are_not_utf8_are_listed_with_u_fffd(servers: ServerFactory) -> None:
    # Bash makes "caf\xe9.txt" (Latin-1); Python reads the name back as "caf\udce9.txt".
    _, (made, listed, grepped) = await run_script(
        servers,
        {},
        ("Bash", {"command": "printf 'needle\\n' > \"$(printf 'caf\\351.txt')\""}),
        ("Glob", {"pattern": "*.txt"}),
        ("Grep", {"pattern": "needle"}),
    )
    assert not made.is_error, made.output
    assert listed.output == "caf\ufffd.txt"
    assert grepped.output == "caf\ufffd.txt:1:needle"


# -- MCP --------------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_an_mcp_tool_answer_with_lone_surrogates_is_a_clean_result(servers: ServerFactory) -> None:
    server = {
        "name": "raw",
        "transport": "stdio",
        "command": sys.executable,
        "args": [str(ROOT / "tests" / "mcp_servers" / "lone_surrogate.py")],
        # Without the repair the SDK drops the answer and the call waits this long.
        "timeout_s": 30,
    }
    _, (result,) = await run_script(servers, {"tools": {"mcp_servers": [server]}}, ("mcp__raw__say", {}))
    assert not result.is_error, result.output
    assert result.output == HEARD
    assert result.duration_ms < 10_000


class _HttpMcp(BaseHTTPRequestHandler):
    """A hand-written streamable-HTTP MCP server (JSON responses) whose tool says `SAID`."""

    def do_POST(self) -> None:
        message = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if "id" not in message:  # a notification
            self._send(202, b"")
            return
        if message["method"] == "initialize":
            info = {"name": "x", "version": "1"}
            version = message["params"]["protocolVersion"]
            result = json.dumps(
                {"protocolVersion": version, "capabilities": {"tools": {}}, "serverInfo": info}
            )
        elif message["method"] == "tools/list":
            result = json.dumps({"tools": [{"name": "say", "inputSchema": {"type": "object"}}]})
        else:
            result = f'{{"content":[{{"type":"text","text":"{SAID}"}}],"isError":false}}'
        self._send(200, f'{{"jsonrpc":"2.0","id":{json.dumps(message["id"])},"result":{result}}}'.encode())

    def do_GET(self) -> None:
        self._send(405, b"")  # no server-initiated stream

    do_DELETE = do_GET

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        if body:
            self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


async def test_an_http_mcp_tool_answer_with_lone_surrogates_is_a_clean_error(servers: ServerFactory) -> None:
    # The SDK's HTTP transport turns a reply it cannot parse into an error of its own: the
    # call fails at once and the run goes on (the stdio transport would wait for the timeout).
    http = ThreadingHTTPServer(("127.0.0.1", 0), _HttpMcp)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{http.server_address[1]}/mcp"
        server = {"name": "raw", "transport": "http", "url": url, "timeout_s": 30}
        config = {"tools": {"mcp_servers": [server]}}
        _, (result,) = await run_script(servers, config, ("mcp__raw__say", {}))
    finally:
        http.shutdown()
        http.server_close()
        thread.join(10)
    assert result.is_error
    assert "refused the call" in result.output
    assert result.duration_ms < 10_000


# -- gRPC input ------------------------------------------------------------------------------------------


@pytest.fixture
async def stub(servers: ServerFactory) -> AsyncIterator[Any]:
    srv = await servers.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        yield svc_grpc.EngineServiceStub(channel), channel


@pytest.mark.parametrize("where", ["task", "struct value", "struct key"])
async def test_grpc_strings_cannot_carry_a_surrogate(stub: Any, where: str) -> None:
    """Protobuf strings, Struct keys and values included, must be UTF-8: a surrogate is refused."""
    ok, channel = stub
    arguments = struct_pb2.Struct()
    arguments.update({"KKK": "VVV"})
    call = svc.ScriptedToolCall(name="echo", arguments=arguments)
    spec = svc.RunSpec(
        task="TTT", model=svc.ModelSpec(provider="scripted", script=[svc.ScriptedTurn(tool_calls=[call])])
    )
    payload = svc.CreateRunRequest(spec=spec).SerializeToString()
    marker = {"task": b"TTT", "struct value": b"VVV", "struct key": b"KKK"}[where]
    assert payload.count(marker) == 1
    # "\ud83d" in the generalised UTF-8 that surrogatepass writes: same length, so framing holds.
    bad = payload.replace(marker, "\ud83d".encode("utf-8", "surrogatepass"))
    raw = channel.unary_unary(
        "/machina.engine.v1.EngineService/CreateRun",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw(bad)
    assert caught.value.code() != grpc.StatusCode.OK
    listed = await ok.ListRuns(svc.ListRunsRequest())
    assert list(listed.runs) == []  # nothing was created, and the server still answers
