"""Input images: names checked, base64 decoded strictly, URLs fetched through the SSRF guard, content verified.

Everything here happens before ComfyUI sees anything of the job: a bad image is refused with the image it
concerns and why ("images[1] 'face.png': base64 has an invalid character '*' at position 12"), and nothing is
uploaded. Decoding and verifying can take a while for a 20 MB image, so they run in a worker thread.

Where ComfyUI keeps its files is defined once, in :func:`comfy_dirs`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from PIL import Image, UnidentifiedImageError

from supervisor.config import Settings
from supervisor.errors import UPLOAD_PREFIX, InvalidInputError
from supervisor.jobs.netguard import FetchError, GuardedFetcher, URLRefused, redact_url

if TYPE_CHECKING:
    from supervisor.jobs.request import InlineImage, JobRequest, SuppliedImage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
FORMAT_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp",
                     "TIFF": ".tiff"}
NAME_MAX = 255  # bytes, the file-name limit of every Linux file system: longer strings cannot be file names
MIN_INLINE_BASE64 = 32  # the smallest real images encode to more than this
_B64_RE = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
_B64URL_RE = re.compile(r"^[A-Za-z0-9_-]*={0,2}$")
_WS_RE = re.compile(r"\s+")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class ComfyDirs:
    """ComfyUI's input, output and temp folders as the supervisor lays them out."""

    input: Path
    output: Path
    temp: Path

    def for_type(self, kind: str) -> Path | None:
        """The folder of a ComfyUI file ``type`` ("input", "output", "temp"), None for anything else."""
        return {"input": self.input, "output": self.output, "temp": self.temp}.get(kind)


def comfy_dirs(settings: Settings) -> ComfyDirs:
    """The one place that knows the layout: ``data_dir/input``, ``data_dir/output``, ``data_dir/temp``."""
    base = Path(settings.data_dir)
    return ComfyDirs(input=base / "input", output=base / "output", temp=base / "temp")


# --- pure checks ---------------------------------------------------------------------------------------


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


def classify_source(text: str, inline: bool = False) -> Literal["data_uri", "url", "base64"] | None:
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


def verify_image(data: bytes) -> str:
    """Return the image format (e.g. "PNG") if ``data`` is a complete image ComfyUI can load; else ValueError."""
    if not data:
        raise ValueError("is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "?"
            width, height = img.size
            img.verify()
    except UnidentifiedImageError:
        raise ValueError(f"is not an image ({_sniff(data)})") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"is too large in pixels: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for damaged files
        raise ValueError(f"is a damaged image: {exc}") from None
    if fmt not in FORMAT_EXTENSIONS:
        raise ValueError(f"is a {fmt} image; accepted: PNG, JPEG, WEBP, GIF, BMP, TIFF")
    if width <= 0 or height <= 0:
        raise ValueError("is an image with no pixels")
    return fmt


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


# --- resolving a request's images ------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    """One image to upload into the job's input subfolder under ``name``."""

    name: str
    data: bytes
    origin: str
    format: str


@dataclass
class ResolvedInputs:
    """The job's images, ready to upload; ``inline`` maps (node id, input) to the file name replacing the data."""

    files: list[InputFile] = field(default_factory=list)
    inline: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def supplied_names(self) -> list[str]:
        return [f.name for f in self.files]

    @property
    def total_bytes(self) -> int:
        return sum(len(f.data) for f in self.files)

    def without_inline(self, keys: set[tuple[str, str]]) -> "ResolvedInputs":
        """These inline images stay as they were sent (the node takes the string itself): not uploaded."""
        dropped = {self.inline[k] for k in keys if k in self.inline}
        return ResolvedInputs(files=[f for f in self.files if f.name not in dropped],
                              inline={k: v for k, v in self.inline.items() if k not in keys})


async def resolve_inputs(request: JobRequest, settings: Settings, fetcher: GuardedFetcher | None) -> ResolvedInputs:
    """Decode, fetch and verify every image of the request, concurrently; one error listing every bad one."""
    supplied = [_resolve_supplied(img, settings, fetcher) for img in request.images]
    inline = [_resolve_inline(img, settings, fetcher) for img in request.inline_images]
    results = await asyncio.gather(*supplied, *inline)
    problems = [r for r in results if isinstance(r, str)]
    if problems:
        raise InvalidInputError.with_problems(UPLOAD_PREFIX, problems)
    resolved = ResolvedInputs()
    taken = {img.name for img in request.images}
    for img, result in zip(request.images, results[: len(supplied)]):
        assert isinstance(result, tuple)
        resolved.files.append(InputFile(name=img.name, data=result[0], origin=img.origin, format=result[1]))
    for img, result in zip(request.inline_images, results[len(supplied):]):
        if result is None:
            continue  # an ordinary file name after all
        assert isinstance(result, tuple)
        name = _unique(_inline_name(img, result[1]), taken)
        resolved.files.append(InputFile(name=name, data=result[0], origin=img.origin, format=result[1]))
        resolved.inline[(img.node_id, img.input_name)] = name
    return resolved


async def _resolve_supplied(
    img: SuppliedImage, settings: Settings, fetcher: GuardedFetcher | None
) -> tuple[bytes, str] | str:
    """(bytes, format) for an ``images`` entry, or the problem line."""
    try:
        data = await _load(img.source, img.kind, settings, fetcher)
        fmt = await asyncio.to_thread(verify_image, data)
    except ValueError as exc:
        return f"{img.origin} {exc}"
    return data, fmt


async def _resolve_inline(
    img: InlineImage, settings: Settings, fetcher: GuardedFetcher | None
) -> tuple[bytes, str] | str | None:
    """Like :func:`_resolve_supplied`; None when a short base64-looking string is not an image (a file name)."""
    try:
        data = await _load(img.source, img.kind, settings, fetcher)
        fmt = await asyncio.to_thread(verify_image, data)
    except ValueError as exc:
        if img.kind == "base64" and len(img.source.encode("utf-8", "surrogatepass")) <= NAME_MAX:
            return None
        return f"{img.origin} {exc}"
    return data, fmt


async def _load(source: str, kind: str, settings: Settings, fetcher: GuardedFetcher | None) -> bytes:
    if kind != "url":
        return await asyncio.to_thread(decode_base64, source, settings.max_input_bytes)
    url = source.strip()
    if not settings.allow_url_inputs or fetcher is None:
        raise ValueError(f"{redact_url(url)} refused: URL inputs are disabled on this worker (ALLOW_URL_INPUTS=false)")
    try:
        result = await fetcher.fetch(url, max_bytes=settings.max_input_bytes)
    except URLRefused as exc:
        raise ValueError(f"{exc.url} refused: {exc.reason}") from None
    except FetchError as exc:
        raise ValueError(f"{exc.url} could not be downloaded: {exc.reason}") from None
    return result.data


def _inline_name(img: InlineImage, fmt: str) -> str:
    node = re.sub(r"[^A-Za-z0-9_-]", "_", img.node_id)[:40] or "node"
    return f"node{node}_{img.input_name}{FORMAT_EXTENSIONS.get(fmt, '.png')}"


def _unique(name: str, taken: set[str]) -> str:
    stem, dot, ext = name.rpartition(".")
    candidate, n = name, 1
    while candidate in taken:
        candidate = f"{stem}_{n}.{ext}" if dot else f"{name}_{n}"
        n += 1
    taken.add(candidate)
    return candidate
