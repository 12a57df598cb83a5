"""Input images: each one of a request decoded or fetched through the SSRF guard, verified, ready to upload.

Everything here happens before ComfyUI sees anything of the job: a bad image is refused with the image it
concerns and why ("images[1] 'face.png': base64 has an invalid character '*' at position 12"), and nothing is
uploaded. Decoding and verifying can take a while for a 20 MB image, so they run in a worker thread; the checks
themselves are pure functions in :mod:`supervisor.jobs.image_checks`.

Where ComfyUI keeps its files is defined once, in :func:`comfy_dirs`.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.config import Settings
from supervisor.errors import UPLOAD_PREFIX, InvalidInputError
from supervisor.jobs.image_checks import FORMAT_EXTENSIONS, NAME_MAX, decode_base64, verify_image
from supervisor.jobs.netguard import FetchError, GuardedFetcher, URLRefused, redact_url
from supervisor.jobs.request import InlineImage, JobRequest, SuppliedImage


@dataclass(frozen=True)
class ComfyDirs:
    """ComfyUI's input, output and temp folders as the supervisor lays them out."""

    input: Path
    output: Path
    temp: Path

    def for_type(self, kind: str) -> Path | None:
        """The folder of a ComfyUI file ``type`` ("input", "output", "temp"), None for anything else."""
        return {"input": self.input, "output": self.output, "temp": self.temp}.get(kind)


JOB_FOLDER_PREFIX = "job-"  # every job folder's name starts so (input/job-.../, output/job-.../): private to its job


def comfy_dirs(settings: Settings) -> ComfyDirs:
    """The one place that knows the layout: ``data_dir/input``, ``data_dir/output``, ``data_dir/temp``."""
    base = Path(settings.data_dir)
    return ComfyDirs(input=base / "input", output=base / "output", temp=base / "temp")


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
        fmt = await asyncio.to_thread(verify_image, data, settings.max_input_pixels)
    except ValueError as exc:
        return f"{img.origin} {exc}"
    return data, fmt


async def _resolve_inline(
    img: InlineImage, settings: Settings, fetcher: GuardedFetcher | None
) -> tuple[bytes, str] | str | None:
    """Like :func:`_resolve_supplied`; None when a short base64-looking string is not an image (a file name)."""
    try:
        data = await _load(img.source, img.kind, settings, fetcher)
        fmt = await asyncio.to_thread(verify_image, data, settings.max_input_pixels)
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
