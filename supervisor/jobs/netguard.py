"""Fetching user-supplied URLs without letting a job reach the worker's own network (SSRF guard).

A job may name an image by URL. Left alone, that lets anyone who can submit a job make the worker request
``http://169.254.169.254/`` (cloud credentials), ComfyUI itself on 127.0.0.1 (which has no authentication),
or anything on the private network. The guard:

1. accepts only ``http`` and ``https``;
2. resolves the host name and refuses it if **any** address is loopback, private, link-local, a cloud
   metadata address, unspecified, multicast, reserved or otherwise not globally routable (a name that
   resolves to a public and a private address is treated as hostile);
3. connects to exactly the addresses it checked -- the check lives in the connector's resolver, so there is
   no second lookup an attacker's DNS could answer differently (DNS rebinding);
4. follows redirects itself, one hop at a time, applying 1-3 to every hop;
5. caps the body size and the total time.

``URL_INPUT_ALLOWLIST`` is a deliberate opening: a listed host name may resolve to anything, and addresses
inside a listed CIDR are accepted. It exists so tests and private deployments can reach named hosts; each
redirect hop is still checked on its own, so an allowlisted host cannot redirect into a refused address.

The piece is small and self-contained so the front doors can reuse it for webhooks (``GuardedFetcher.fetch``
with ``method="POST"``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = ("http", "https")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
CHUNK = 64 * 1024

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
    )
)
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, not "private" before 3.12.4


class URLRefused(Exception):
    """The URL is not allowed: wrong scheme, or the host is (or resolves to) a refused address."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = redact_url(url)
        self.reason = reason
        super().__init__(f"{self.url} refused: {reason}")


class FetchError(Exception):
    """The URL was allowed but could not be fetched: connection, HTTP status, size, timeout."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = redact_url(url)
        self.reason = reason
        super().__init__(f"{self.url} could not be downloaded: {reason}")


@dataclass(frozen=True)
class FetchResult:
    url: str  # the final URL, after redirects (redacted)
    status: int
    content_type: str
    data: bytes


def redact_url(url: str | URL) -> str:
    """The URL for messages and logs: no user:password, no query string or fragment (they may hold tokens)."""
    try:
        u = URL(str(url))
        shown = u.with_query(None).with_fragment(None)
        if u.user is not None or u.password is not None:
            shown = shown.with_user(None)
        return str(shown) + ("?..." if u.query_string else "")
    except (ValueError, TypeError):
        return "<unparseable URL>"


def address_kind(address: IPAddress) -> str | None:
    """What kind of non-public address this is ("a loopback address"), or None for a public unicast one."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.version == 4 and address in SHARED_ADDRESS_SPACE:
        return "a shared (carrier-grade NAT) address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private:
        return "a private address"
    if address.is_reserved or not address.is_global:
        return "not a public address"
    return None


def address_refusal(address: IPAddress) -> str | None:
    """Why ``address`` must not be contacted ("127.0.0.1 is a loopback address"), or None if it may be."""
    kind = address_kind(address)
    if kind is None:
        return None
    return f"{address} is {kind}"


@dataclass(frozen=True)
class Allowlist:
    """Host names (exact, case-insensitive) and networks that the guard lets through."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> "Allowlist":
        hosts, networks = set(), []
        for entry in entries:
            entry = entry.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.networks)


class _Refused(Exception):
    """Raised inside the resolver (which does not know the URL); the fetcher turns it into URLRefused,
    or into FetchError when ``refused`` is False (the name does not resolve at all)."""

    def __init__(self, reason: str, refused: bool = True) -> None:
        self.reason = reason
        self.refused = refused
        super().__init__(reason)


class GuardedResolver(AbstractResolver):
    """Resolves with the system resolver, then refuses if any address is not allowed.

    aiohttp connects to the addresses the resolver returns, so what was checked is what is contacted.
    """

    def __init__(self, allowlist: Allowlist) -> None:
        self._allowlist = allowlist
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        try:
            infos = await self._inner.resolve(host, port, family)
        except OSError as exc:
            raise _Refused(f"the host name {host!r} does not resolve ({exc.strerror or exc})", refused=False) from None
        if self._allowlist.allows_host(host):
            return infos
        for info in infos:
            address = ipaddress.ip_address(info["host"].split("%", 1)[0])
            kind = address_kind(address)
            if kind and not self._allowlist.allows_address(address):
                raise _Refused(f"{host} resolves to {address}, which is {kind}")
        return infos

    async def close(self) -> None:
        await self._inner.close()


class GuardedFetcher:
    """An aiohttp session whose every connection goes through the guard. Create in a running loop; close()."""

    def __init__(
        self,
        allowlist: Iterable[str] = (),
        *,
        timeout_s: float = 30.0,
        max_redirects: int = MAX_REDIRECTS,
        user_agent: str = "comfyui-worker",
    ) -> None:
        self.allowlist = Allowlist.parse(allowlist)
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self._headers = {"User-Agent": user_agent}
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allowlist), use_dns_cache=False)
            # trust_env=False: never hand the request to an HTTP proxy, which would do its own (unchecked) lookup
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False, headers=self._headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def check_url(self, url: str | URL) -> URL:
        """Scheme and literal-address checks for one hop (names are checked when resolved)."""
        try:
            u = URL(str(url))
        except (ValueError, TypeError):
            raise URLRefused(str(url), "it is not a valid URL") from None
        if u.scheme.lower() not in ALLOWED_SCHEMES:
            raise URLRefused(str(url), f"only http and https URLs are accepted, not {u.scheme or 'no scheme'!r}")
        host = u.host
        if not host:
            raise URLRefused(str(url), "it has no host")
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return u  # a name: the resolver checks what it resolves to
        reason = address_refusal(address)
        if reason and not self.allowlist.allows_address(address):
            raise URLRefused(str(url), reason)
        return u

    async def fetch(
        self,
        url: str,
        *,
        max_bytes: int,
        method: str = "GET",
        json: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        accept_status: range = range(200, 300),
    ) -> FetchResult:
        """Fetch ``url`` through the guard, following up to ``max_redirects`` checked redirects."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url, max_bytes, method, json, data, headers, accept_status)
        except TimeoutError:
            raise FetchError(url, f"timed out after {self.timeout_s:g} s") from None

    async def _fetch(
        self,
        url: str,
        max_bytes: int,
        method: str,
        json: Any,
        data: bytes | None,
        headers: Mapping[str, str] | None,
        accept_status: range,
    ) -> FetchResult:
        session = self._get_session()
        current = url
        for _hop in range(self.max_redirects + 1):
            u = self.check_url(current)
            try:
                async with session.request(
                    method, u, json=json, data=data, headers=headers, allow_redirects=False
                ) as resp:
                    if resp.status in REDIRECT_STATUSES and "Location" in resp.headers:
                        current = str(u.join(URL(resp.headers["Location"])))
                        if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                            method, json, data = "GET", None, None
                        continue
                    if resp.status not in accept_status:
                        raise FetchError(str(u), f"HTTP {resp.status} {resp.reason or ''}".strip())
                    body = await _read_capped(resp, max_bytes, str(u))
                    return FetchResult(redact_url(u), resp.status, resp.content_type, body)
            except _Refused as exc:
                if not exc.refused:
                    raise FetchError(str(u), exc.reason) from None
                raise URLRefused(str(u), exc.reason) from None
            except aiohttp.ClientConnectorError as exc:
                raise FetchError(str(u), f"could not connect ({exc.os_error.strerror or exc.os_error})") from None
            except aiohttp.InvalidURL as exc:
                raise URLRefused(str(u), f"it is not a valid URL ({exc})") from None
            except aiohttp.ClientError as exc:
                raise FetchError(str(u), f"{type(exc).__name__}: {exc}") from None
        raise FetchError(url, f"more than {self.max_redirects} redirects")


async def _read_capped(resp: aiohttp.ClientResponse, max_bytes: int, url: str) -> bytes:
    """The body, refusing early (Content-Length) or while reading once it passes ``max_bytes``."""
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise FetchError(url, f"it is {_mb(resp.content_length)}, over the {_mb(max_bytes)} limit (MAX_INPUT_BYTES)")
    chunks, total = [], 0
    async for chunk in resp.content.iter_chunked(CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise FetchError(url, f"it is over the {_mb(max_bytes)} limit (MAX_INPUT_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


def _mb(n: int) -> str:
    """A size for messages: bytes below 1 MB, else MB with one decimal."""
    return f"{n} bytes" if n < 1024 * 1024 else f"{n / (1024 * 1024):.1f} MB"
