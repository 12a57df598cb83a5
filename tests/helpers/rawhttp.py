"""Raw HTTP over a real socket: send any bytes (malformed on purpose), read back the one response they get.

HTTP client libraries refuse to send most of what hostile clients send (bad methods, control characters, conflicting
length headers), so the hardening and fuzz tests speak to the worker through this instead.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawResponse:
    """One response as read off the socket; ``status`` 0 when the connection ended without one."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""
    elapsed_s: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def is_json_error(self) -> bool:
        """The API's documented error body: exactly ``{"error": "<text>"}``, served as JSON."""
        if not self.headers.get("content-type", "").startswith("application/json"):
            return False
        try:
            body = self.json()
        except ValueError:
            return False
        return isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str) and body["error"]


def parse_response(data: bytes, head_request: bool = False) -> RawResponse | None:
    """The first complete final response in ``data`` (``100 Continue`` skipped), or None while it is incomplete.

    The answer to a ``HEAD`` request (``head_request``) has no body, whatever its ``Content-Length`` says."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if parts[1].startswith("1"):
        return parse_response(rest, head_request)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head_request else int(headers.get("content-length", "0"))
    if len(rest) < length:
        return None
    return RawResponse(status=int(parts[1]), headers=headers, body=rest[:length], raw=data)


def exchange(port: int, data: bytes, timeout: float = 10.0, host: str = "127.0.0.1") -> RawResponse:
    """Send ``data`` on a new connection and read the first response (or what came before the connection ended)."""
    started = time.monotonic()
    received = b""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the worker may answer and close before reading everything (e.g. a line too long)
        deadline = started + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, socket.timeout):
                break
            except OSError:
                break
            if not chunk:
                break
            received += chunk
            parsed = parse_response(received, head_request=data.startswith(b"HEAD "))
            if parsed is not None:
                parsed.elapsed_s = time.monotonic() - started
                return parsed
    return RawResponse(status=0, raw=received, elapsed_s=time.monotonic() - started)


def request_bytes(method: str, path: str, body: bytes = b"", headers: list[tuple[str, bytes | str]] | None = None,
                  key: str | None = None, length: bool = True) -> bytes:
    """A request with ``Host``, the bearer ``key`` if given, ``headers`` as given, and a Content-Length."""
    out = f"{method} {path} HTTP/1.1\r\nHost: worker\r\n".encode()
    if key:
        out += f"Authorization: Bearer {key}\r\n".encode()
    for name, value in headers or []:
        out += name.encode() + b": " + (value.encode() if isinstance(value, str) else value) + b"\r\n"
    if length:
        out += f"Content-Length: {len(body)}\r\n".encode()
    return out + b"\r\n" + body
