"""The SSRF guard against real loopback servers: refused addresses, allowlist, redirects, caps, timeouts."""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any

import pytest

from supervisor.jobs.netguard import (
    Allowlist,
    FetchError,
    GuardedFetcher,
    GuardedResolver,
    URLRefused,
    address_refusal,
    redact_url,
)
from tests.helpers.jobs import loopback_server, redirect, slow, static, streamed


async def refused(url: str, allow: tuple[str, ...] = (), **kw: Any) -> URLRefused:
    fetcher = GuardedFetcher(allow, timeout_s=5)
    try:
        with pytest.raises(URLRefused) as info:
            await fetcher.fetch(url, max_bytes=1000, **kw)
    finally:
        await fetcher.close()
    return info.value


async def failed(url: str, allow: tuple[str, ...] = (), timeout_s: float = 5, max_bytes: int = 1000) -> FetchError:
    fetcher = GuardedFetcher(allow, timeout_s=timeout_s)
    try:
        with pytest.raises(FetchError) as info:
            await fetcher.fetch(url, max_bytes=max_bytes)
    finally:
        await fetcher.close()
    return info.value


@pytest.mark.parametrize(
    "address, reason",
    [
        ("127.0.0.1", "127.0.0.1 is a loopback address"),
        ("10.0.0.1", "10.0.0.1 is a private address"),
        ("192.168.1.5", "192.168.1.5 is a private address"),
        ("172.16.0.1", "172.16.0.1 is a private address"),
        ("169.254.169.254", "169.254.169.254 is a cloud metadata address"),
        ("169.254.1.1", "169.254.1.1 is a link-local address"),
        ("0.0.0.0", "0.0.0.0 is an unspecified address"),
        ("100.64.0.1", "100.64.0.1 is a shared (carrier-grade NAT) address"),
        ("224.0.0.1", "224.0.0.1 is a multicast address"),
        ("::1", "::1 is a loopback address"),
        ("::", ":: is an unspecified address"),
        ("fe80::1", "fe80::1 is a link-local address"),
        ("fd00::1", "fd00::1 is a private address"),
        ("fd00:ec2::254", "fd00:ec2::254 is a cloud metadata address"),
        ("::ffff:10.0.0.1", "::ffff:a00:1 is a private address"),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_classification(address: str, reason: str | None) -> None:
    assert address_refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://127.0.0.1:9/x.png", "http://127.0.0.1:9/x.png refused: 127.0.0.1 is a loopback address"),
        ("http://10.0.0.1/x.png", "http://10.0.0.1/x.png refused: 10.0.0.1 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "http://169.254.169.254/latest/meta-data/ refused: 169.254.169.254 is a cloud metadata address"),
        ("http://[::1]:9/x.png", "http://[::1]:9/x.png refused: ::1 is a loopback address"),
        ("http://0.0.0.0:9/", "http://0.0.0.0:9/ refused: 0.0.0.0 is an unspecified address"),
        ("file:///etc/passwd", "file:///etc/passwd refused: only http and https URLs are accepted, not 'file'"),
        ("ftp://example.com/a.png", "ftp://example.com/a.png refused: only http and https URLs are accepted, not 'ftp'"),
        ("http://2130706433/", "http://2130706433/ refused: it is not a valid URL (2130706433 - is not a canonical IPv4 address)"),
    ],
)
async def test_literal_addresses_and_schemes_are_refused(url: str, message: str) -> None:
    assert str(await refused(url)) == message


async def test_a_name_resolving_to_loopback_is_refused_and_never_contacted() -> None:
    async with loopback_server({"/a.png": static(b"x")}) as srv:
        err = await refused(srv.url("/a.png", host="localhost"))
        assert re.fullmatch(r"localhost resolves to (127\.0\.0\.1|::1), which is a loopback address", err.reason)
        assert srv.hits == []


async def test_allowlisted_host_name_is_fetched() -> None:
    async with loopback_server({"/a.png": static(b"image-bytes", "image/png")}) as srv:
        fetcher = GuardedFetcher(("localhost",), timeout_s=5)
        try:
            result = await fetcher.fetch(srv.url("/a.png", host="localhost"), max_bytes=1000)
        finally:
            await fetcher.close()
        assert (result.data, result.status, result.content_type) == (b"image-bytes", 200, "image/png")
        assert srv.hits == ["/a.png"]


async def test_allowlisted_cidr_admits_the_literal_address() -> None:
    async with loopback_server({"/a.png": static(b"ok")}) as srv:
        fetcher = GuardedFetcher(("127.0.0.0/8",), timeout_s=5)
        try:
            assert (await fetcher.fetch(srv.url("/a.png"), max_bytes=10)).data == b"ok"
        finally:
            await fetcher.close()


@pytest.mark.parametrize(
    "target, reason",
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"),
        ("http://10.0.0.1/x.png", "10.0.0.1 is a private address"),
        ("http://[::1]/x.png", "::1 is a loopback address"),
    ],
)
async def test_allowlisted_server_redirecting_to_a_refused_address_is_refused(target: str, reason: str) -> None:
    async with loopback_server({"/r": redirect(target)}) as srv:
        err = await refused(srv.url("/r", host="localhost"), allow=("localhost",))
        assert err.reason == reason
        assert srv.hits == ["/r"]


async def test_redirect_to_loopback_literal_is_refused_and_the_target_never_hit() -> None:
    async with loopback_server({"/secret": static(b"secret")}) as inner:
        async with loopback_server({"/r": redirect(inner.url("/secret"))}) as outer:
            err = await refused(outer.url("/r", host="localhost"), allow=("localhost",))
            assert str(err) == f"http://127.0.0.1:{inner.port}/secret refused: 127.0.0.1 is a loopback address"
        assert inner.hits == []


async def test_redirects_are_followed_and_capped() -> None:
    async with loopback_server({"/a.png": static(b"final")}) as srv:
        ports: dict[str, int] = {}
        routes = {f"/r{i}": redirect(lambda i=i: f"http://localhost:{ports['chain']}/r{i + 1}") for i in range(7)}
        routes["/r7"] = redirect(srv.url("/a.png", host="localhost"), status=307)
        async with loopback_server(routes) as chain:
            ports["chain"] = chain.port
            fetcher = GuardedFetcher(("localhost",), timeout_s=5, max_redirects=5)
            try:
                two = await fetcher.fetch(chain.url("/r6", host="localhost"), max_bytes=100)
                assert two.data == b"final"
                with pytest.raises(FetchError) as info:
                    await fetcher.fetch(chain.url("/r0", host="localhost"), max_bytes=100)
                assert info.value.reason == "more than 5 redirects"
            finally:
                await fetcher.close()


async def test_size_cap_by_content_length_and_while_streaming() -> None:
    routes = {"/big": static(b"x" * 5000), "/stream": streamed(10, b"y" * 1000)}
    async with loopback_server(routes) as srv:
        err = await failed(srv.url("/big", host="localhost"), allow=("localhost",), max_bytes=4096)
        assert err.reason == "it is 5000 bytes, over the 4096 bytes limit (MAX_INPUT_BYTES)"
        err = await failed(srv.url("/stream", host="localhost"), allow=("localhost",), max_bytes=4096)
        assert err.reason == "it is over the 4096 bytes limit (MAX_INPUT_BYTES)"


async def test_timeout_http_errors_and_unresolvable_names() -> None:
    async with loopback_server({"/slow": slow(3.0), "/missing": static(b"", status=404)}) as srv:
        err = await failed(srv.url("/slow", host="localhost"), allow=("localhost",), timeout_s=0.3)
        assert err.reason == "timed out after 0.3 s"
        err = await failed(srv.url("/missing", host="localhost"), allow=("localhost",))
        assert err.reason == "HTTP 404 Not Found"
    err = await failed("http://no-such-host.invalid/a.png")
    assert err.reason.startswith("the host name 'no-such-host.invalid' does not resolve")


async def test_messages_never_show_credentials_or_query_strings() -> None:
    err = await refused("http://user:hunter2@127.0.0.1/a.png?token=s3cret#frag")
    assert str(err) == "http://127.0.0.1/a.png?... refused: 127.0.0.1 is a loopback address"
    assert redact_url("https://a:b@example.com/x?sig=1") == "https://example.com/x?..."


class _FakeInner:
    """A system resolver answering what an attacker's DNS would: a public and a private address."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
                for a in self.addresses]

    async def close(self) -> None:
        pass


async def test_resolver_fails_closed_on_mixed_answers_and_returns_exactly_what_it_checked() -> None:
    resolver = GuardedResolver(Allowlist.parse(()))
    resolver._inner = _FakeInner(["93.184.215.14", "10.1.2.3"])  # type: ignore[assignment]
    with pytest.raises(Exception) as info:
        await resolver.resolve("rebind.example", 80)
    assert str(info.value) == "rebind.example resolves to 10.1.2.3, which is a private address"
    resolver._inner = _FakeInner(["93.184.215.14"])  # type: ignore[assignment]
    assert [r["host"] for r in await resolver.resolve("public.example", 80)] == ["93.184.215.14"]
