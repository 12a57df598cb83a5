"""A finished prompt's files: which ones, in what order, read from disk, optionally re-encoded, serialised.

ComfyUI reports each output node's files in ``/history`` (and ``executed`` events) under keys that depend
on the node: ``images`` (SaveImage, PreviewImage, SaveAnimatedWEBP/PNG), ``gifs`` (video combine nodes),
``audio``, ``video``, ``3d``... Every list entry with a ``filename`` is a file: all of them are returned,
not only ``images`` (the official worker's users keep asking for gifs, videos and audio).

Order is deterministic -- workflow node order, then the order ComfyUI lists a node's files (batch index) --
because seed 003's clients read ``images[0]``.

Files are read from ComfyUI's folders (:func:`supervisor.jobs.inputs.comfy_dirs`), never through ``/view``, and
never outside those folders whatever a node reports.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import mimetypes
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from supervisor.jobs.inputs import ComfyDirs

EXTRA_TYPES = {
    ".webp": "image/webp", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
    ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff", ".webm": "video/webm", ".mp4": "video/mp4",
    ".mkv": "video/x-matroska", ".mov": "video/quicktime", ".flac": "audio/flac", ".mp3": "audio/mpeg",
    ".wav": "audio/wav", ".ogg": "audio/ogg", ".opus": "audio/opus", ".m4a": "audio/mp4", ".glb": "model/gltf-binary",
    ".json": "application/json", ".txt": "text/plain", ".latent": "application/octet-stream",
}
STILL_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/bmp", "image/tiff"})
CONVERSIONS = {"jpeg": ("JPEG", ".jpg", "image/jpeg"), "webp": ("WEBP", ".webp", "image/webp")}
ENTRY_OVERHEAD = 256  # JSON keys and punctuation around one output, generously


def media_type(filename: str) -> str:
    ext = Path(filename).suffix.lower()
    return EXTRA_TYPES.get(ext) or mimetypes.guess_type(filename)[0] or "application/octet-stream"


@dataclass(frozen=True)
class OutputRef:
    """One file a node reported: where it is and who made it."""

    node_id: str
    class_type: str
    filename: str
    subfolder: str
    type: str  # "output" or "temp"
    key: str  # the UI key it was listed under ("images", "gifs", "audio", ...)
    index: int
    cached: bool  # the node was replayed from ComfyUI's cache: the file belongs to an earlier prompt

    def path(self, dirs: ComfyDirs) -> Path | None:
        """The file on disk, or None if the reported name would leave ComfyUI's folder."""
        root = dirs.for_type(self.type) if self.type in ("output", "temp") else None
        if root is None or not self.filename or "\x00" in self.filename + self.subfolder:
            return None
        base = root.resolve()
        candidate = (base / self.subfolder / self.filename).resolve()
        return candidate if candidate.is_relative_to(base) and candidate != base else None


def collect_refs(
    ui_outputs: Mapping[str, Any],
    graph: Mapping[str, Mapping[str, Any]],
    cached_nodes: Iterable[str] = (),
) -> list[OutputRef]:
    """Every reported file of type output/temp, in workflow node order then listing order, without duplicates."""
    cached = set(cached_nodes)
    order = list(graph) + sorted(k for k in ui_outputs if k not in graph)
    refs: list[OutputRef] = []
    seen: set[tuple[str, str, str]] = set()
    for node_id in order:
        ui = ui_outputs.get(node_id)
        if not isinstance(ui, Mapping):
            continue
        class_type = str((graph.get(node_id) or {}).get("class_type", ""))
        for key, items in ui.items():
            if not isinstance(items, list):
                continue
            for index, item in enumerate(items):
                if not isinstance(item, Mapping) or not isinstance(item.get("filename"), str):
                    continue
                ftype = str(item.get("type") or "output")
                if ftype not in ("output", "temp"):
                    continue
                ident = (ftype, str(item.get("subfolder") or ""), item["filename"])
                if ident in seen:
                    continue
                seen.add(ident)
                refs.append(OutputRef(node_id, class_type, item["filename"], ident[1], ftype, str(key), index,
                                      node_id in cached))
    return refs


def merge_ui_outputs(history_outputs: Mapping[str, Any] | None, executed: Mapping[str, Any]) -> dict[str, Any]:
    """History is authoritative; ``executed`` events fill in if history lacks a node (it should not)."""
    merged: dict[str, Any] = {k: v for k, v in executed.items()}
    for node_id, ui in (history_outputs or {}).items():
        merged[node_id] = ui
    return merged


@dataclass
class LoadedFile:
    ref: OutputRef
    filename: str  # as returned (extension changed when re-encoded)
    media_type: str
    data: bytes


def read_and_convert(ref: OutputRef, path: Path, image_format: str, quality: int) -> LoadedFile:
    """Read one file (in a worker thread) and re-encode still images when jpeg/webp was asked for."""
    data = path.read_bytes()
    kind = media_type(ref.filename)
    conversion = CONVERSIONS.get(image_format)
    if conversion is None or kind not in STILL_IMAGE_TYPES or kind == conversion[2]:
        return LoadedFile(ref, ref.filename, kind, data)
    pil_format, ext, new_type = conversion
    with Image.open(io.BytesIO(data)) as img:
        if getattr(img, "n_frames", 1) > 1:
            return LoadedFile(ref, ref.filename, kind, data)  # animations keep their own format
        if pil_format == "JPEG" and img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format=pil_format, quality=quality)
    return LoadedFile(ref, str(Path(ref.filename).with_suffix(ext)), new_type, buf.getvalue())


async def load_files(
    refs: Sequence[OutputRef], dirs: ComfyDirs, *, include_temp: bool, image_format: str, quality: int,
    graph: Mapping[str, Any],
) -> tuple[list[LoadedFile], list[str]]:
    """Read every wanted file off the event loop; a missing or unreadable one is a warning, not a failure."""
    wanted = [r for r in refs if r.type == "output" or include_temp]
    warnings: list[str] = []

    async def one(ref: OutputRef) -> LoadedFile | None:
        label = f"node {ref.node_id} ({ref.class_type})" if ref.class_type else f"node {ref.node_id}"
        path = ref.path(dirs)
        if path is None:
            warnings.append(f"{label}: reported file {ref.filename!r} is outside ComfyUI's {ref.type} folder; skipped")
            return None
        try:
            return await asyncio.to_thread(read_and_convert, ref, path, image_format, quality)
        except FileNotFoundError:
            why = " (ComfyUI replayed it from its cache after the file was deleted)" if ref.cached else ""
            warnings.append(f"{label}: reported file {ref.filename!r} does not exist{why}; skipped")
        except OSError as exc:
            warnings.append(f"{label}: reported file {ref.filename!r} could not be read ({exc.strerror or exc}); skipped")
        except Exception as exc:  # noqa: BLE001 - Pillow, when re-encoding
            warnings.append(f"{label}: {ref.filename!r} could not be re-encoded as {image_format} ({exc}); skipped")
        return None

    loaded = await asyncio.gather(*(one(r) for r in wanted))
    return [f for f in loaded if f is not None], warnings


def serialised_size(files: Sequence[LoadedFile], warnings: Sequence[str]) -> int:
    """An upper estimate of the JSON result with base64 data, computed before encoding anything."""
    size = 512 + sum(len(w) + 8 for w in warnings)
    for f in files:
        size += 4 * math.ceil(len(f.data) / 3) + ENTRY_OVERHEAD + 2 * len(f.filename)
    return size


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class JobOutput:
    """One output of a job, as every response format needs it."""

    filename: str
    node_id: str
    media_type: str
    size: int
    data: str  # base64, or the presigned URL when ``kind`` is "s3_url"
    kind: Literal["base64", "s3_url"]
    type: str = "output"  # "output" or "temp" (previews)

    def to_dict(self) -> dict[str, Any]:
        return {"filename": self.filename, "node_id": self.node_id, "media_type": self.media_type,
                "size": self.size, "data": self.data, "kind": self.kind, "type": self.type}
