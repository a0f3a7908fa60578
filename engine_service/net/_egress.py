"""One egress policy for every destination a tenant or a model can choose.

WebFetch URLs, per-run ApiCall ``base_url``s and webhook URLs are chosen by a model that a
prompt injection may steer, or by a tenant's run spec. They must not reach the engine's own
host, its private network or a cloud metadata service. ``EgressPolicy`` decides which
addresses are refused (loopback, private, link-local, CGNAT, multicast, reserved,
unspecified, metadata, and the same addresses wrapped in IPv4-mapped, NAT64, 6to4 or Teredo
IPv6) unless the operator allows the host name or a network.

The check and the connection cannot disagree: ``EgressTransport`` plugs a network backend
into httpcore that resolves the host name once, checks every address the answer holds, and
connects to exactly those addresses. httpcore still sends the original ``Host`` header and
runs TLS with the host name for SNI and certificate checks, since it takes both from the
request URL, not from the socket. A DNS answer that changes between check and connect (DNS
rebinding) therefore changes nothing, and every redirect hop, every new connection, goes
through the same check.

Operator-configured destinations (engine-level ApiCall services, the model provider, MCP
servers, runner URLs) are trusted and do not use this policy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
import unicodedata
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TypeAlias
from urllib.parse import urlsplit

import httpcore
import httpx

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> the addresses to connect to, as text; raises OSError when the name does not resolve.
Resolver = Callable[[str, int], Awaitable[list[str]]]

# Cloud instance metadata services: refused even when private addresses are allowed, because
# they hand out the host's cloud credentials. Only an explicit host or network allows them.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.169.123",  # AWS time sync
        "169.254.169.250",  # AWS Route 53 resolver
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (legacy)
        "fd00:ec2::254",  # AWS over IPv6
        "fd00:ec2::23",  # AWS DNS over IPv6
    )
)
_METADATA = "cloud metadata"
# One part of an inet_aton address: hex (0x7f, even a bare 0x), octal (0177) or decimal.
_INET_ATON_PART = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")
# Full stops IDNA reads as ".": "127。0。0。1" is 127.0.0.1 to httpx.
_IDNA_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class EgressRefused(httpx.ConnectError):
    """The policy refused a destination; the message names the host and why, never a secret."""


async def system_resolver(host: str, port: int) -> list[str]:
    """The system's answer for ``host`` (every address, in the order the system prefers)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def normalise_host(host: str) -> str:
    """Lower case, no brackets, no trailing dot, IDNA (A-label) form; IP literals in canonical form."""
    host = host.strip().strip("[]").rstrip(".").lower()
    literal = ip_literal(host)
    if literal is not None:
        return str(literal)
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` denotes as a literal, in any form a resolver would accept.

    Beyond dotted quads this reads the BSD ``inet_aton`` forms resolvers still honour:
    ``2130706433``, ``0x7f.1``, ``0177.0.0.01``, ``127.1``; IPv6 with or without brackets
    or a zone id. A trailing dot does not make a literal a name. Look-alike characters
    (fullwidth or circled digits, ideographic full stops) are read as IDNA's mapping
    would read them.
    """
    host = unicodedata.normalize("NFKC", host).strip().strip("[]").strip().translate(_IDNA_DOTS).rstrip(".")
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            return None
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_INET_ATON_PART.fullmatch(part) for part in parts):
        return None
    numbers = [
        int(part[2:] or "0", 16) if part[:2].lower() == "0x" else int(part, 8 if part[0] == "0" else 10)
        for part in parts
    ]
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        return None
    value = last
    for index, n in enumerate(head):
        value += n << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def refusal_reason(address: IPAddress) -> str | None:
    """Why ``address`` is not a public destination (``None`` if it is one)."""
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        address = ipaddress.IPv6Address(str(address).split("%", 1)[0])
    if address in METADATA_ADDRESSES:
        return _METADATA
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = refusal_reason(embedded)
            return f"{inner}, embedded in IPv6" if inner else None
    checks: tuple[tuple[bool, str], ...] = (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (isinstance(address, ipaddress.IPv4Address) and address in _CGNAT, "shared (CGNAT)"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
        (not address.is_global, "non-global"),
    )
    return next((what for hit, what in checks if hit), None)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (IPv4-mapped, NAT64, 6to4, Teredo client).

    The deprecated IPv4-compatible form ``::a.b.c.d`` is not read: it lies in ``::/8``,
    which is reserved and refused as it is.
    """
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in net for net in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)  # the low 32 bits
    return None


@dataclass(frozen=True)
class EgressPolicy:
    """Which non-public destinations the operator allows, and how host names are resolved.

    ``allow_hosts`` (names or IP literals) and ``allow_networks`` allow anything, metadata
    included; ``allow_private`` allows every non-public address except cloud metadata.
    """

    allow_private: bool = False
    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[IPNetwork, ...] = ()
    resolver: Resolver = field(default=system_resolver, compare=False, repr=False)

    @classmethod
    def from_settings(
        cls,
        *,
        allow_private: bool = False,
        allow_hosts: Iterable[str] = (),
        allow_networks: Iterable[str] = (),
        resolver: Resolver | None = None,
    ) -> EgressPolicy:
        """A policy from config values (``ValueError`` for a network that does not parse)."""
        return cls(
            allow_private=allow_private,
            allow_hosts=frozenset(normalise_host(h) for h in allow_hosts if h.strip()),
            allow_networks=tuple(ipaddress.ip_network(n.strip(), strict=False) for n in allow_networks),
            resolver=resolver or system_resolver,
        )

    def widened(self, *, allow_private: bool = False, allow_hosts: Iterable[str] = ()) -> EgressPolicy:
        """This policy plus more allowances (WebFetch's own settings add to the engine's)."""
        return replace(
            self,
            allow_private=self.allow_private or allow_private,
            allow_hosts=self.allow_hosts | {normalise_host(h) for h in allow_hosts if h.strip()},
        )

    def host_allowed(self, host: str) -> bool:
        return normalise_host(host) in self.allow_hosts

    def refusal(self, address: IPAddress) -> str | None:
        """Why this policy refuses ``address`` (``None`` if it may be connected to)."""
        reason = refusal_reason(address)
        if reason is None or any(address in net for net in self.allow_networks):
            return None
        if self.allow_private and not reason.startswith(_METADATA):
            return None
        return reason

    def url_refusal(self, url: str) -> str | None:
        """Why a URL is refused without resolving anything: its host is a refused IP literal
        (in any encoding) or a ``localhost`` name. Other names are checked when connecting."""
        try:
            host = urlsplit(url).hostname or ""
        except ValueError:
            return None  # the URL's own validation reports it
        if not host or self.host_allowed(host):
            return None
        name = host.rstrip(".").lower()
        if name == "localhost" or name.endswith(".localhost"):
            literal: IPAddress | None = ipaddress.IPv4Address("127.0.0.1")  # RFC 6761: always loopback
        else:
            literal = ip_literal(host)
        reason = self.refusal(literal) if literal is not None else None
        return _message(host, reason, literal) if reason else None

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The checked addresses to connect to for ``host``; ``EgressRefused`` if any is refused.

        One refused address refuses the name: connecting only to the good ones would let a
        name that also points inside probe it through retries.
        """
        literal = ip_literal(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                answer = await self.resolver(host, port)
                addresses = [ipaddress.ip_address(a) for a in answer]
            except (OSError, ValueError):
                raise EgressRefused(f"cannot resolve host {host!r}") from None
            if not addresses:
                raise EgressRefused(f"cannot resolve host {host!r}")
        if self.host_allowed(host):
            return addresses
        for address in addresses:
            reason = self.refusal(address)
            if reason:
                raise EgressRefused(_message(host, reason, address))
        return addresses

    def transport(self, *, verify: ssl.SSLContext, limits: httpx.Limits | None = None) -> EgressTransport:
        return EgressTransport(self, verify=verify, limits=limits or httpx.Limits())


def _message(host: str, reason: str, address: IPAddress | None = None) -> str:
    shown = address is not None and str(address) != host.strip("[]")
    where = f" ({address}, {reason})" if shown else f" ({reason})"
    verb = "is" if ip_literal(host) is not None else "resolves to"
    return f"refused: {host!r} {verb} a non-public address{where}; the operator can allow it"


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Resolves through the policy and connects to the checked addresses only."""

    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._policy.resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from None
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options,
                )  # fmt: skip
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise EgressRefused("unix sockets are not a permitted destination")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class EgressTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over ``_CheckedBackend``: no proxies from the environment, HTTP/1.1."""

    def __init__(self, policy: EgressPolicy, *, verify: ssl.SSLContext, limits: httpx.Limits) -> None:
        super().__init__(verify=verify, trust_env=False, limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=verify,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_CheckedBackend(policy),
        )
