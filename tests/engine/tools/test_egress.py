"""The egress policy: what tenants and models may reach (WebFetch, per-run ApiCall, webhooks).

The address classifier is tested on a corpus of encodings; the transport on real loopback
servers (also over TLS); the engine through gRPC with a scripted model. A test resolver,
passed as a parameter, maps made-up names to loopback addresses, so "a name that resolves
to 127.0.0.1" and "DNS rebinding" are tested without touching the system's resolver.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client_py import AsyncEngineClient, DestinationRefusedError, MachinaError, ToolCallCompleted
from engine_service.net._egress import EgressPolicy, EgressRefused, ip_literal, refusal_reason
from machina.engine.v1 import engine_service_pb2 as svc
from machina.engine.v1 import engine_service_pb2_grpc as svc_grpc
from tests import grpc_errors
from tests.certs import make_pki
from tests.conftest import ServerFactory, turn
from tests.processes import EngineProcess
from tests.webhook_receiver import Receiver

# -- the classifier ------------------------------------------------------------------------------

# Every one of these names a loopback, private, link-local, CGNAT, multicast, reserved,
# unspecified or metadata address (or a localhost name), in some notation a resolver accepts.
REFUSED_URLS = [
    "http://127.0.0.1/", "http://127.0.0.1./", "http://127.1/", "http://127.0.1/", "http://127.255.255.254/",
    "http://2130706433/", "http://0x7f000001/", "http://0x7f.1/", "http://0X7F.0.0.1/", "http://0177.0.0.1/",
    "http://0177.1/", "http://017700000001/", "http://0x7f.0x0.0x0.0x1/", "http://0000177.0.0.1/",
    "http://[::1]/", "http://[0:0:0:0:0:0:0:1]/", "http://[::1]:8080/", "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/", "http://[64:ff9b::127.0.0.1]/", "http://[64:ff9b:1::a00:1]/",
    "http://[2002:7f00:1::]/", "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "http://[::127.0.0.1]/",
    "http://0.0.0.0/", "http://0/", "http://0x0/", "http://[::]/",
    "http://localhost/", "http://LOCALHOST./", "http://a.b.localhost/", "https://localhost:443/",
    "http://10.0.0.1/", "http://10.255.255.255/", "http://012.0.0.1/", "http://167772161/",
    "http://172.16.0.1/", "http://172.31.255.255/", "http://192.168.0.1/", "http://0xc0a80001/",
    "http://169.254.169.254/latest/meta-data/", "http://169.254.170.2/", "http://0xa9fea9fe/",
    "http://2852039166/", "http://0251.0376.0251.0376/", "http://[fd00:ec2::254]/", "http://100.100.100.200/",
    "http://[::ffff:169.254.169.254]/", "http://[::ffff:a9fe:a9fe]/",
    "http://100.64.0.1/", "http://100.127.255.255/", "http://[fe80::1]/", "http://[fe80::1%25eth0]/",
    "http://169.254.1.1/", "http://[fc00::1]/", "http://[fd12:3456::1]/",
    "http://224.0.0.1/", "http://239.255.255.250/", "http://[ff02::1]/", "http://255.255.255.255/",
    "http://240.0.0.1/", "http://192.0.2.1/", "http://198.18.0.1/", "http://192.0.0.1/", "http://[2001:db8::1]/",
    "http://[::ffff:10.0.0.1]/", "http://evil.example@127.0.0.1/", "http://user:pw@[::1]/",
    "http://127\u30020\u30020\u30021/", "http://127\uff0e0\uff0e0\uff0e1/", "http://\uff11\uff12\uff17.0.0.1/",
    "http://\u2460\u2461\u2466.0.0.1/",
]  # fmt: skip

PUBLIC_URLS = [
    "http://8.8.8.8/", "http://1.1.1.1/", "http://134744072/", "http://0x08080808/", "http://[2606:4700:4700::1111]/",
    "http://[::ffff:8.8.8.8]/", "http://[64:ff9b::8.8.8.8]/", "http://example.com/", "http://127.0.0.1.example.com/",
    "http://localhost.example.com/", "http://0x7f.example/", "http://1e100.net/",
]  # fmt: skip


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_every_notation_of_a_non_public_address_is_refused(url: str) -> None:
    refusal = EgressPolicy().url_refusal(url)
    assert refusal is not None
    assert "non-public address" in refusal


@pytest.mark.parametrize("url", PUBLIC_URLS)
def test_public_addresses_and_names_pass_the_literal_check(url: str) -> None:
    assert EgressPolicy().url_refusal(url) is None


@pytest.mark.parametrize(
    ("host", "address"),
    [("2130706433", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("0177.0.0.01", "127.0.0.1"),
     ("127.1", "127.0.0.1"), ("10.1", "10.0.0.1"), ("192.168.257", "192.168.1.1"),
     ("127.0.0.1.", "127.0.0.1"),
     ("[::1]", "::1"),
     ("example.com", None), ("1.2.3.4.5", None), ("256.1.1.1", None), ("0x1g.1", None), ("1..1", None),
     ("4294967296", None), ("08.1.1.1", None), ("", None), ("0x7_f.1", None), ("+1.1.1.1", None),
     ("1.1.1.1 ", "1.1.1.1"), ("0x.0.0.1", "0.0.0.1"), ("\u2460\u2461\u2466.0.0.1", "127.0.0.1"),
     ("\uff11\uff12\uff17.0.0.1", "127.0.0.1"), ("127\u30020\u30020\u30021", "127.0.0.1")],
)  # fmt: skip
def test_ip_literals_are_read_like_a_resolver_reads_them(host: str, address: str | None) -> None:
    parsed = ip_literal(host)
    assert (str(parsed) if parsed else None) == address


def _encodings(value: int) -> list[str]:
    """Spellings of one IPv4 address that BSD ``inet_aton`` (and so getaddrinfo) accepts."""
    a, b, c, d = value.to_bytes(4, "big")
    return [
        str(value), hex(value), f"0{value:o}", f"{a}.{b}.{c}.{d}", f"{a:#x}.{b:#x}.{c:#x}.{d:#x}",
        f"0{a:o}.0{b:o}.0{c:o}.0{d:o}", f"{a}.{b}.{(c << 8) | d}", f"{a}.{(b << 16) | (c << 8) | d}",
        f"{a:#x}.{b}.0{c:o}.{d}", f"{a}.{b}.{c}.{d}.", f"0x{value:08X}",
    ]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1) | st.sampled_from([0x7F000001, 0xA9FEA9FE, 0x0A000001, 0xC0A80001, 0]))
def test_every_spelling_of_any_ipv4_address_is_judged_as_that_address(value: int) -> None:
    address = ipaddress.IPv4Address(value)
    for spelling in _encodings(value):
        assert ip_literal(spelling) == address, spelling
        # The system's own reader agrees (glibc inet_aton, which getaddrinfo uses for literals).
        assert socket.inet_aton(spelling.rstrip(".")) == address.packed, spelling
        refused = EgressPolicy().url_refusal(f"http://{spelling}:8080/x") is not None
        assert refused == (refusal_reason(address) is not None), spelling


def test_reasons_name_the_kind_of_address() -> None:
    reason = refusal_reason
    assert reason(ipaddress.ip_address("169.254.169.254")) == "cloud metadata"
    assert reason(ipaddress.ip_address("::ffff:169.254.169.254")) == "cloud metadata, embedded in IPv6"
    assert reason(ipaddress.ip_address("100.64.0.1")) == "shared (CGNAT)"
    assert reason(ipaddress.ip_address("fe80::1%eth0")) == "link-local"
    assert reason(ipaddress.ip_address("93.184.216.34")) is None


def test_allowances_widen_the_policy_but_metadata_needs_an_explicit_one() -> None:
    private = EgressPolicy(allow_private=True)
    assert private.url_refusal("http://10.1.2.3/") is None
    assert private.url_refusal("http://127.0.0.1/") is None
    for metadata in (
        "http://169.254.169.254/",
        "http://[fd00:ec2::254]/",
        "http://[::ffff:169.254.169.254]/",
    ):
        assert private.url_refusal(metadata), metadata
    hosts = EgressPolicy.from_settings(allow_hosts=["127.0.0.1", "Internal.Example."])
    assert hosts.url_refusal("http://2130706433/") is None  # the same address, however it is spelled
    assert hosts.url_refusal("http://127.0.0.2/")
    assert hosts.host_allowed("internal.example")
    networks = EgressPolicy.from_settings(allow_networks=["10.0.0.0/8", "169.254.169.254/32"])
    assert networks.url_refusal("http://10.9.9.9/") is None
    assert networks.url_refusal("http://169.254.169.254/") is None
    assert networks.url_refusal("http://192.168.0.1/")
    widened = EgressPolicy().widened(allow_hosts=["localhost"])
    assert widened.url_refusal("http://localhost/") is None
    assert EgressPolicy().url_refusal("http://localhost/")


# -- test servers and a test resolver ------------------------------------------------------------


class Recorder:
    """An HTTP server on ``host``:``port`` that records (method, path, Host header) of every request.

    ``/redirect?to=URL`` answers 302 to URL; anything else 200 with a short text.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, str, str]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                recorder.requests.append((self.command, self.path, self.headers.get("host", "")))
                target = parse_qs(urlsplit(self.path).query).get("to")
                if self.path.startswith("/redirect") and target:
                    self.send_response(302)
                    self.send_header("Location", target[0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = b"recorded " + self.path.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer((host, port), Handler)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class FakeDns:
    """A resolver for the egress policy: each name has a list of answers, used in turn (the
    last one repeats). Every question is recorded. Unknown names do not resolve."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.questions: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.questions.append(host)
        if host not in self.answers:
            raise OSError(f"no such host {host}")
        turns = self.answers[host]
        return turns.pop(0) if len(turns) > 1 else turns[0]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


def dns() -> FakeDns:
    return FakeDns({
        "internal.test": [["127.0.0.1"]],
        "mixed.test": [["8.8.8.8", "127.0.0.1"]],
        "metadata.test": [["169.254.169.254"]],
        "v6.test": [["::1"]],
        "mapped.test": [["::ffff:127.0.0.1"]],
        "api.example": [["127.0.0.1"]],
        "hooks.example": [["127.0.0.1"]],
    })  # fmt: skip


def client_over(policy: EgressPolicy, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=policy.transport(verify=ssl.create_default_context()), **kwargs)


# -- the transport --------------------------------------------------------------------------------


async def test_the_transport_connects_to_the_checked_address_and_keeps_the_host(recorder: Recorder) -> None:
    resolver = dns()
    policy = EgressPolicy.from_settings(allow_hosts=["api.example"], resolver=resolver)
    async with client_over(policy) as http:
        response = await http.get(f"http://api.example:{recorder.port}/page")
    assert response.text == "recorded /page"
    assert recorder.requests == [("GET", "/page", f"api.example:{recorder.port}")]
    assert resolver.questions == ["api.example"]


@pytest.mark.parametrize("name", ["internal.test", "mixed.test", "metadata.test", "v6.test", "mapped.test"])
async def test_the_transport_refuses_a_name_with_any_non_public_answer(recorder: Recorder, name: str) -> None:
    async with client_over(EgressPolicy(resolver=dns())) as http:
        with pytest.raises(EgressRefused, match="non-public address"):
            await http.get(f"http://{name}:{recorder.port}/secret")
    assert recorder.requests == []


async def test_every_redirect_hop_goes_through_the_check(recorder: Recorder) -> None:
    policy = EgressPolicy.from_settings(allow_hosts=["api.example"], resolver=dns())
    base = f"http://api.example:{recorder.port}"
    inward = ("internal.test", "127.0.0.1", "2130706433", "[::1]", "mapped.test")
    async with client_over(policy, follow_redirects=True) as http:
        for host in inward:
            target = f"http://{host}:{recorder.port}/secret"
            with pytest.raises(EgressRefused):
                await http.get(f"{base}/redirect", params={"to": target})
        ok = await http.get(f"{base}/redirect", params={"to": f"{base}/fine"})
    assert ok.text == "recorded /fine"
    assert [path for _, path, _ in recorder.requests if not path.startswith("/redirect")] == ["/fine"]


async def test_dns_rebinding_cannot_swap_the_checked_address() -> None:
    # The name first answers an allowed address, then loopback. A checker that resolves and
    # then lets the client resolve again would connect to the second answer.
    allowed = Recorder("127.0.0.2")
    try:
        inside = Recorder("127.0.0.1", allowed.port)
    except OSError:
        allowed.close()
        pytest.skip("the port is taken on 127.0.0.1")
    resolver = FakeDns({"rebind.test": [["127.0.0.2"], ["127.0.0.1"]]})
    policy = EgressPolicy.from_settings(allow_networks=["127.0.0.2/32"], resolver=resolver)
    try:
        async with client_over(policy) as http:
            response = await http.get(f"http://rebind.test:{allowed.port}/x")
    finally:
        allowed.close()
        inside.close()
    assert response.text == "recorded /x"
    assert resolver.questions == ["rebind.test"]
    assert allowed.requests == [("GET", "/x", f"rebind.test:{allowed.port}")]
    assert inside.requests == []


async def test_tls_verifies_the_name_not_the_address(tmp_path: Path) -> None:
    # The certificate covers "localhost" and 127.0.0.1, not "elsewhere.test": a client that
    # verified the address it connected to would accept it for both names.
    pki = make_pki(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(pki.server_cert, pki.server_key)
    sni: list[str | None] = []
    server_tls.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    server = Recorder(tls=server_tls)
    resolver = FakeDns({"localhost": [["127.0.0.1"]], "elsewhere.test": [["127.0.0.1"]]})
    policy = EgressPolicy.from_settings(allow_hosts=["localhost", "elsewhere.test"], resolver=resolver)
    client_tls = ssl.create_default_context(cafile=str(pki.ca_cert))
    try:
        async with httpx.AsyncClient(transport=policy.transport(verify=client_tls)) as http:
            good = await http.get(f"https://localhost:{server.port}/tls")
            with pytest.raises(httpx.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|match"):
                await http.get(f"https://elsewhere.test:{server.port}/tls")
    finally:
        server.close()
    assert good.text == "recorded /tls"
    assert sni[0] == "localhost"
    assert server.requests == [("GET", "/tls", f"localhost:{server.port}")]


async def test_a_name_that_does_not_resolve_is_a_clean_refusal() -> None:
    async with client_over(EgressPolicy(resolver=dns())) as http:
        with pytest.raises(EgressRefused, match="cannot resolve"):
            await http.get("http://nowhere.test/")


# -- through the engine: WebFetch -----------------------------------------------------------------


def outputs(events: list[Any]) -> list[ToolCallCompleted]:
    done = [e for e in events if isinstance(e, ToolCallCompleted)]
    return sorted(done, key=lambda e: int(e.call_id.rsplit("_", 1)[1]))


async def run_tool_calls(
    port: int, calls: list[tuple[str, dict[str, Any]]], **options: Any
) -> list[ToolCallCompleted]:
    async with AsyncEngineClient(f"127.0.0.1:{port}") as client:
        execution = client.execute("go", model="scripted", script=[turn("", *calls), turn("done")], **options)
        events = [e async for e in execution]
    assert execution.run is not None
    assert execution.run.state == "DONE", execution.run
    return outputs(events)


async def test_webfetch_refuses_every_hostile_target(servers: ServerFactory, recorder: Recorder) -> None:
    resolver = dns()
    # One name is allowed (an operator's "public" service that happens to redirect inward).
    srv = await servers.start(config={"egress_allow_hosts": ["api.example"]}, resolver=resolver)
    p = recorder.port
    hostile = [
        f"http://127.0.0.1:{p}/a", f"http://2130706433:{p}/a", f"http://0x7f.1:{p}/a", f"http://0177.0.0.1:{p}/a",
        f"http://127.1:{p}/a", f"http://[::1]:{p}/a", f"http://[::ffff:127.0.0.1]:{p}/a", f"http://0.0.0.0:{p}/a",
        f"http://localhost:{p}/a", f"http://LocalHost.:{p}/a", f"http://127.0.0.1.:{p}/a",
        f"http://internal.test:{p}/a", f"http://mixed.test:{p}/a", f"http://mapped.test:{p}/a",
        f"http://metadata.test:{p}/a", "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/",
        "http://10.0.0.1/", "http://100.64.0.1/",
        f"http://api.example:{p}/redirect?to=http://internal.test:{p}/b",
        f"http://api.example:{p}/redirect?to=http://127.0.0.1:{p}/b",
        f"http://api.example:{p}/redirect?to=http://0x7f000001:{p}/b",
    ]  # fmt: skip
    # Look-alikes: refused by the policy, or not a valid host name at all; either way an error.
    lookalikes = [
        f"http://127\u30020\u30020\u30021:{p}/a", f"http://\u24db\u24de\u24d2\u24d0\u24db\u24d7\u24de\u24e2\u24e3:{p}/a",
        f"http://\uff11\uff12\uff17.0.0.1:{p}/a", f"http://\u2460\u2461\u2466.0.0.1:{p}/a", f"http://loc\u00adalhost:{p}/a",
        f"http://127.0.0.1\\@internal.test:{p}/a", f"http://internal.test\\@127.0.0.1:{p}/a",
    ]  # fmt: skip
    results = await run_tool_calls(srv.port, [("WebFetch", {"url": u}) for u in hostile + lookalikes])
    for url, result in zip(hostile + lookalikes, results, strict=True):
        assert result.is_error, url
        reasons = ("non-public address", "invalid URL", "URLs with credentials")
        assert any(reason in result.output for reason in reasons), (url, result.output)
    # Nothing reached the server but the three redirects of the allowed name.
    assert [path for _, path, _ in recorder.requests if not path.startswith("/redirect")] == []
    assert len(recorder.requests) == 3


async def test_webfetch_reaches_an_allowed_name_at_the_address_that_was_checked(
    servers: ServerFactory, recorder: Recorder
) -> None:
    resolver = dns()
    srv = await servers.start(config={"tools": {"webfetch_allow_hosts": ["api.example"]}}, resolver=resolver)
    (result,) = await run_tool_calls(
        srv.port, [("WebFetch", {"url": f"http://api.example:{recorder.port}/page"})]
    )
    assert not result.is_error, result.output
    assert "recorded /page" in result.output
    assert recorder.requests == [("GET", "/page", f"api.example:{recorder.port}")]
    assert resolver.questions == ["api.example"]  # resolved once, by the policy


async def test_webfetch_does_not_re_resolve_a_rebinding_name(servers: ServerFactory) -> None:
    allowed = Recorder("127.0.0.2")
    try:
        inside = Recorder("127.0.0.1", allowed.port)
    except OSError:
        allowed.close()
        pytest.skip("the port is taken on 127.0.0.1")
    resolver = FakeDns({"rebind.test": [["127.0.0.2"], ["127.0.0.1"]]})
    srv = await servers.start(config={"egress_allow_networks": ["127.0.0.2/32"]}, resolver=resolver)
    try:
        (result,) = await run_tool_calls(
            srv.port, [("WebFetch", {"url": f"http://rebind.test:{allowed.port}/x"})]
        )
    finally:
        allowed.close()
        inside.close()
    assert "recorded /x" in result.output
    assert inside.requests == []
    assert resolver.questions == ["rebind.test"]


# -- through the engine: per-run ApiCall services -----------------------------------------------


def api(base_url: str) -> dict[str, Any]:
    return {"services": [{"name": "tenant", "base_url": base_url}]}


@pytest.mark.parametrize(
    "base_url",
    ["http://127.0.0.1:9", "http://2130706433", "http://0x7f.1", "http://[::1]", "http://localhost:8080",
     "http://169.254.169.254/latest", "http://[::ffff:169.254.169.254]", "http://10.0.0.1/v1", "http://0.0.0.0"],
)  # fmt: skip
async def test_a_per_run_service_on_a_literal_inner_address_is_invalid_argument(
    servers: ServerFactory, base_url: str
) -> None:
    srv = await servers.start()
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
        with pytest.raises(DestinationRefusedError) as caught:
            await client.create("x", model="scripted", script=[turn("done")], api=api(base_url))
    assert caught.value.code == "ERR_DESTINATION_REFUSED"
    assert "base_url" in str(caught.value)


async def test_a_per_run_service_whose_name_resolves_inward_is_refused_at_call_time(
    servers: ServerFactory, recorder: Recorder
) -> None:
    srv = await servers.start(resolver=dns())
    call = ("ApiCall", {"service": "tenant", "method": "GET", "path": "/secret"})
    (result,) = await run_tool_calls(srv.port, [call], api=api(f"http://internal.test:{recorder.port}"))
    assert result.is_error
    assert "non-public address" in result.output
    assert "internal.test" in result.output
    assert recorder.requests == []


async def test_operator_services_are_exempt_and_allowed_tenant_services_work(
    servers: ServerFactory, recorder: Recorder
) -> None:
    # The operator's own service on loopback needs no allowance; a tenant's needs one.
    operator = {"api": {"services": [{"name": "ops", "base_url": f"http://127.0.0.1:{recorder.port}"}]}}
    strict = await servers.start(config=operator, resolver=dns())
    calls = [
        ("ApiCall", {"service": "ops", "path": "/ops"}),
        ("ApiCall", {"service": "tenant", "path": "/t"}),
    ]
    tenant_api = api(f"http://api.example:{recorder.port}")
    ops, tenant = await run_tool_calls(strict.port, calls, api=tenant_api)
    assert not ops.is_error
    assert json.loads(ops.output)["body"] == "recorded /ops"
    assert tenant.is_error
    assert "non-public address" in tenant.output
    # A tenant cannot escape by naming its service like the operator's: that is refused at the door.
    with pytest.raises(MachinaError, match="ERR_API_SERVICE_SHADOWED"):
        await run_tool_calls(strict.port, [calls[0]], api={"services": [
            {"name": "ops", "base_url": f"http://internal.test:{recorder.port}"}]})  # fmt: skip
    await servers.stop_all()

    allowing = await servers.start(config={**operator, "egress_allow_hosts": ["api.example"]}, resolver=dns())
    (tenant,) = await run_tool_calls(allowing.port, [calls[1]], api=tenant_api)
    assert not tenant.is_error, tenant.output
    assert json.loads(tenant.output)["body"] == "recorded /t"
    assert recorder.requests[-1] == ("GET", "/t", f"api.example:{recorder.port}")
    assert [path for _, path, _ in recorder.requests] == ["/ops", "/t"]


# -- through the engine: webhooks -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9/hook", "http://2130706433/hook", "http://0x7f.0.0.1/hook", "http://[::1]/hook",
     "http://localhost/hook", "http://169.254.169.254/hook", "http://[fd00:ec2::254]/hook",
     "http://[::ffff:127.0.0.1]/hook", "http://192.168.1.1/hook", "http://0/hook"],
)  # fmt: skip
async def test_a_webhook_on_a_literal_inner_address_is_invalid_argument(
    servers: ServerFactory, url: str
) -> None:
    srv = await servers.start(config={"tools": {"permissions": {"double": "ask"}}})
    async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
        with pytest.raises(DestinationRefusedError, match=r"webhook\.url"):
            await client.create("x", model="scripted", script=[turn("done")], webhook={"url": url})
        script = [turn("", ("double", {"x": 2})), turn("done")]
        handle = await client.create("x", model="scripted", script=script)
        run = await handle.wait(timeout=10)
        assert run.state == "PAUSED"
    # On resume too (the webhook replaces the run's), through the generated stub.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        request = svc.ResumeRunRequest(run_id=run.run_id, webhook=svc.Webhook(url=url))
        request.decisions.add(interrupt_id=run.interrupts[0].interrupt_id, approve=svc.Approve())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await svc_grpc.EngineServiceStub(channel).ResumeRun(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_errors.error_info(caught.value).reason == "ERR_DESTINATION_REFUSED"


async def test_a_webhook_whose_name_resolves_inward_is_not_delivered(servers: ServerFactory) -> None:
    receiver = Receiver()
    port = int(receiver.url.split(":")[2].split("/")[0])
    srv = await servers.start(resolver=dns())
    try:
        async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
            webhook = {"url": f"http://hooks.example:{port}/hook"}
            run = await client.execute("x", model="scripted", script=[turn("done")], webhook=webhook).result()
        deliveries: list[Any] = []
        for _ in range(200):
            deliveries = await srv.engine.webhooks.deliveries("default", run.run_id)
            if deliveries:
                break
            await asyncio.sleep(0.02)
    finally:
        receiver.close()
    assert receiver.requests == []
    (attempt,) = deliveries  # refused once, not retried
    assert not attempt["ok"]
    assert "non-public address" in attempt["error"]
    assert "hooks.example" in attempt["error"]


async def test_an_allowed_webhook_name_is_delivered_to_the_checked_address(servers: ServerFactory) -> None:
    receiver = Receiver()
    port = int(receiver.url.split(":")[2].split("/")[0])
    srv = await servers.start(config={"egress_allow_hosts": ["hooks.example"]}, resolver=dns())
    try:
        async with AsyncEngineClient(f"127.0.0.1:{srv.port}") as client:
            webhook = {"url": f"http://hooks.example:{port}/hook"}
            await client.execute("x", model="scripted", script=[turn("done")], webhook=webhook).result()
        await receiver.wait_for(1)
    finally:
        receiver.close()
    headers, _ = receiver.requests[0]
    assert headers["host"] == f"hooks.example:{port}"


# -- a real engine process, configured by environment ---------------------------------------------


@pytest.mark.slow
async def test_an_engine_process_applies_the_policy_from_its_settings(
    tmp_path: Path, recorder: Recorder
) -> None:
    env = {"MACHINA_STORAGE": str(tmp_path / "s"), "MACHINA_WORKDIR_ROOT": str(tmp_path / "w")}
    engine = EngineProcess(tmp_path, env=env)
    try:
        async with AsyncEngineClient(engine.target) as client:
            with pytest.raises(DestinationRefusedError):
                await client.create(
                    "x", model="scripted", script=[turn("done")], webhook={"url": "http://0x7f.1/"}
                )
            calls = [("WebFetch", {"url": f"http://localhost:{recorder.port}/a"}),
                     ("WebFetch", {"url": f"http://2130706433:{recorder.port}/a"})]  # fmt: skip
            execution = client.execute("x", model="scripted", script=[turn("", *calls), turn("done")])
            refused = outputs([e async for e in execution])
    finally:
        engine.close()
    assert all(r.is_error and "non-public address" in r.output for r in refused)
    assert recorder.requests == []

    allowing = EngineProcess(tmp_path, env={**env, "MACHINA_EGRESS_ALLOW_HOSTS": "localhost"})
    try:
        async with AsyncEngineClient(allowing.target) as client:
            execution = client.execute("x", model="scripted", script=[turn("", calls[0]), turn("done")])
            (fetched,) = outputs([e async for e in execution])
    finally:
        allowing.close()
    assert "recorded /a" in fetched.output
    assert recorder.requests == [("GET", "/a", f"localhost:{recorder.port}")]
