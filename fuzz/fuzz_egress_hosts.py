"""Fuzz target: host literals in the egress policy (engine_service/net/_egress.py).

Contract: every string the system's own resolver reads as a numeric address
(``getaddrinfo`` with ``AI_NUMERICHOST``, which follows ``inet_aton`` for IPv4: ``0x7f.1``,
``2130706433``, ``0177.0.0.1``...) is read by ``ip_literal`` as that same address, so the
policy judges the address the socket would reach; ``url_refusal`` never raises, and refuses
a URL whose host reads as an address ``refusal_reason`` names.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import atheris
from _harness import run

with atheris.instrument_imports(include=["engine_service.net._egress"]):
    from engine_service.net._egress import EgressPolicy, ip_literal, refusal_reason

PIECES = ["0", "1", "7", "8", "9", "127", "255", "256", "0x", "0X", "7f", "ff", "00", "017", "4294967295",
          "2130706433", ".", ".", ".", ":", "::", "ffff", "[", "]", "%", "eth0", " ", "\t", "a", "e", "x",
          "\u3002", "\uff0e", "\uff11", "\u2460", "-", "+", "_", "localhost", "@", "/"]  # fmt: skip
POLICY = EgressPolicy()


def numeric(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        infos = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return ipaddress.ip_address(str(infos[0][4][0]).split("%", 1)[0])


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        host = "".join(
            PIECES[fdp.ConsumeIntInRange(0, len(PIECES) - 1)] for _ in range(fdp.ConsumeIntInRange(1, 9))
        )
    else:
        host = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40))
    if "\x00" in host:
        return
    system = numeric(host)
    ours = ip_literal(host)
    if system is not None:
        plain = ipaddress.ip_address(str(ours).split("%", 1)[0]) if ours is not None else None
        if plain != system:
            raise AssertionError(f"the resolver reads {host!r} as {system}, ip_literal as {ours}")
    # Never raises, and a literal it reads as a refused address is refused.
    refusal = POLICY.url_refusal(f"http://{host}/")
    if ours is not None and refusal_reason(ours) and _hostname(f"http://{host}/") == host and refusal is None:
        raise AssertionError(f"{host!r} reads as {ours} ({refusal_reason(ours)}) but passed url_refusal")


def _hostname(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


if __name__ == "__main__":
    run(test_one_input)
