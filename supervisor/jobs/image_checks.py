"""One input image, checked without I/O: its file name, what an image string holds, strict base64, real image bytes.

Both ends of an image's way in need these: parsing a request (:mod:`supervisor.jobs.request`) checks names and
tells data URIs, URLs and base64 apart at submission time; resolving its images (:mod:`supervisor.jobs.inputs`)
decodes and verifies them. Living below both, they let the request know nothing of the resolver.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Literal

from PIL import Image, UnidentifiedImageError

SourceKind = Literal["data_uri", "url", "base64"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
FORMAT_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp",
                     "TIFF": ".tiff"}
NAME_MAX = 255  # bytes, the file-name limit of every Linux file system: longer strings cannot be file names
MIN_INLINE_BASE64 = 32  # the smallest real images encode to more than this
_B64_RE = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
_WS_RE = re.compile(r"\s+")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def validate_name(name: str) -> str:
    """A supplied image's name must be a plain image file name; raise ValueError saying why it is not."""
    if not name or not name.strip():
        raise ValueError("is empty")
    if "\x00" in name:
        raise ValueError("must not contain a NUL character")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name:
        raise ValueError("must be a plain file name (no '/', '\\' or '..')")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("must not contain control characters")
    if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX:
        raise ValueError(f"is longer than {NAME_MAX} bytes")
    if name.startswith("."):
        raise ValueError("must not start with '.'")
    if not name.lower().endswith(IMAGE_EXTENSIONS):
        raise ValueError("must end with an image extension (" + ", ".join(IMAGE_EXTENSIONS) + ")")
    return name


def classify_source(text: str, inline: bool = False) -> SourceKind | None:
    """What an image string is. For a node input (``inline``) only strings that may be image data count."""
    head = text.lstrip()[:16].lower()
    if head.startswith("data:"):
        return "data_uri"
    if head.startswith(("http://", "https://")):
        return "url"
    if _SCHEME_RE.match(text.lstrip()):
        return None if inline else "url"  # refused later with "only http and https"
    if not inline:
        return "base64"
    return "base64" if looks_like_base64(text) else None


def looks_like_base64(text: str) -> bool:
    """Cheap test: long enough, only base64 characters, a multiple of 4. Decoding decides for real."""
    if len(text) < MIN_INLINE_BASE64:
        return False
    compact = _WS_RE.sub("", text)
    return len(compact) % 4 == 0 and bool(_B64_RE.match(compact) or _B64URL_RE.match(compact))


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Strict base64 (a data URI prefix and line breaks allowed); ValueError says exactly what is wrong."""
    payload = text.strip()
    if payload[:5].lower() == "data:":
        header, sep, payload = payload.partition(",")
        if not sep:
            raise ValueError("is a data URI without a ',' before the data")
        if not header.lower().endswith(";base64"):
            raise ValueError("is a data URI that is not base64 (it must start like data:image/png;base64,)")
    compact = _WS_RE.sub("", payload)
    if not compact:
        raise ValueError("has no base64 data")
    estimate = len(compact) * 3 // 4 - (len(compact) - len(compact.rstrip("=")))  # exact for valid base64
    if estimate > max_bytes:
        raise ValueError(f"is {_mb(estimate)} decoded, over the {_mb(max_bytes)} limit (MAX_INPUT_BYTES)")
    alphabet = _B64_RE
    if ("-" in compact or "_" in compact) and "+" not in compact and "/" not in compact:
        alphabet = _B64URL_RE  # the URL-safe alphabet, as some browsers' encoders produce
    if not alphabet.match(compact):
        pos, char = next(((i, c) for i, c in enumerate(compact) if not _is_b64_char(c, alphabet)), (0, "?"))
        raise ValueError(f"is not valid base64: invalid character {char!r} at position {pos}")
    if len(compact) % 4:
        raise ValueError(
            f"is not valid base64: its length {len(compact)} is not a multiple of 4 (truncated, or '=' padding missing)"
        )
    try:
        if alphabet is _B64URL_RE:
            return base64.urlsafe_b64decode(compact)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"is not valid base64: {exc}") from None


def _is_b64_char(char: str, alphabet: re.Pattern[str]) -> bool:
    return bool(alphabet.match(char)) or char == "="


def verify_image(data: bytes, max_pixels: int) -> str:
    """Return the image format (e.g. "PNG") if ``data`` is a complete image ComfyUI can load; else ValueError.

    The size comes from the image's header, before anything is decoded: a few KB of compressed pixels can
    describe a picture of gigapixels, for which ComfyUI would build a tensor of gigabytes. Every frame counts
    (ComfyUI loads them all).
    """
    if not data:
        raise ValueError("is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "?"
            width, height = img.size
            _check_pixels(width, height, getattr(img, "n_frames", 1), max_pixels)
            img.verify()
    except UnidentifiedImageError:
        raise ValueError(f"is not an image ({_sniff(data)})") from None
    except Image.DecompressionBombError:
        raise ValueError(f"is over the limit of {_mp(max_pixels)} (MAX_INPUT_PIXELS)") from None
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for damaged files
        raise ValueError(f"is a damaged image: {exc}") from None
    if fmt not in FORMAT_EXTENSIONS:
        raise ValueError(f"is a {fmt} image; accepted: PNG, JPEG, WEBP, GIF, BMP, TIFF")
    if width <= 0 or height <= 0:
        raise ValueError("is an image with no pixels")
    return fmt


def _check_pixels(width: int, height: int, frames: int, max_pixels: int) -> None:
    total = width * height * max(frames, 1)
    if total > max_pixels:
        shape = f"{width} x {height} pixels" + (f" x {frames} frames" if frames > 1 else "")
        raise ValueError(f"is {shape} ({_mp(total)}), over the limit of {_mp(max_pixels)} (MAX_INPUT_PIXELS)")


def _mp(pixels: int) -> str:
    return f"{pixels / 1_000_000:.1f} megapixels"


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "it is an HTML page"
    if head.startswith((b"{", b"[")):
        return "it is JSON"
    try:
        text = data[:256].decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c.isspace() for c in text):
        return "it is text"
    return f"its first bytes are {data[:8].hex()}"


def _mb(n: int) -> str:
    """A size for messages: bytes below 1 MB, else MB with one decimal."""
    return f"{n} bytes" if n < 1024 * 1024 else f"{n / (1024 * 1024):.1f} MB"
