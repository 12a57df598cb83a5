"""The values that flow along links: images, masks, latents and synthetic model objects.

There is no torch here. IMAGE is a batch of same-sized 8-bit RGB Pillow images, MASK a batch of 'L'
images, LATENT a dict with a ``Latent`` under ``samples``; model-like values (MODEL, CLIP, VAE,
CONDITIONING, ...) are ``Synthetic`` objects carrying a digest of everything that produced them, so the
final picture depends on every input (seed, text, sizes, model names, input image bytes) and a test can
tell that the right inputs arrived. ``str()`` of an image batch imitates torch's tensor repr because
ComfyUI puts ``str(tensor)`` into ``execution_error.current_inputs``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


def digest(*parts: Any) -> str:
    """A short stable hash of ``parts`` (their repr), used to carry provenance through the graph."""
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


class Images:
    """IMAGE: a batch of RGB images, shape [B, H, W, 3] in ComfyUI terms."""

    def __init__(self, frames: list, written: list[int] | None = None) -> None:
        if not frames:
            raise ValueError("an IMAGE batch needs at least one frame")
        self.frames = [f if f.mode == "RGB" else f.convert("RGB") for f in frames]
        # The 8-bit value a save node writes for each value of ``frames``, where ComfyUI's float32 result lies
        # just below the exact one and truncates to one less (ImageInvert); None: written as held.
        self.written = written

    def frames_to_write(self) -> list:
        """The frames as a save node writes them: ``uint8(clip(255 * x))`` of ComfyUI's float32 values."""
        if self.written is None:
            return self.frames
        return [f.point(self.written * 3) for f in self.frames]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        w, h = self.frames[0].size
        return (len(self.frames), h, w, 3)

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self):
        return iter(self.frames)

    def content_digest(self) -> str:
        """Hash of the pixels: what a downstream synthetic node must depend on."""
        return digest(*[(f.size, hashlib.sha256(f.tobytes()).hexdigest()) for f in self.frames])

    def __str__(self) -> str:
        if not _small(self):
            return _summarized_repr(self.frames, 3)
        return tensor_repr([[[[v / 255.0 for v in px] for px in row] for row in _rows(f, 3)] for f in self.frames])

    __repr__ = __str__


class Masks:
    """MASK: a batch of single-channel images, shape [B, H, W]."""

    def __init__(self, frames: list) -> None:
        self.frames = [f if f.mode == "L" else f.convert("L") for f in frames]

    @property
    def shape(self) -> tuple[int, int, int]:
        w, h = self.frames[0].size
        return (len(self.frames), h, w)

    def content_digest(self) -> str:
        return digest(*[(f.size, hashlib.sha256(f.tobytes()).hexdigest()) for f in self.frames])

    def __str__(self) -> str:
        return f"tensor(<mask {list(self.shape)}>)"

    __repr__ = __str__


@dataclass
class Latent:
    """The ``samples`` of a LATENT: its shape in latent space and the digest of what produced it."""

    batch: int
    height: int  # in pixels / 8, like a real latent
    width: int
    origin: str

    def __str__(self) -> str:
        return f"tensor(<latent [{self.batch}, 4, {self.height}, {self.width}] {self.origin}>)"


@dataclass
class Synthetic:
    """MODEL, CLIP, VAE, CONDITIONING, CLIP_VISION(_OUTPUT), IPADAPTER, EMBEDS, INSIGHTFACE stand-ins."""

    kind: str
    origin: str
    info: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"<{self.kind} {self.origin}>"


def _rows(frame, channels: int) -> list[list[tuple[int, ...]]]:
    """Pixel rows of a frame as lists of channel tuples."""
    w, h = frame.size
    data = list(frame.getdata())
    return [[data[y * w + x] if channels > 1 else (data[y * w + x],) for x in range(w)] for y in range(h)]


_SUMMARY_THRESHOLD = 1000
_EDGE = 3


def _small(images: Images) -> bool:
    b, h, w, c = images.shape
    return b * h * w * c <= _SUMMARY_THRESHOLD


def _summarized_repr(frames: list, channels: int) -> str:
    """torch's summarized repr (first and last 3 along every dimension) without touching every pixel."""
    def pick(n: int) -> list[int | None]:
        if n > 2 * _EDGE:
            return list(range(_EDGE)) + [None] + list(range(n - _EDGE, n))
        return list(range(n))

    batch = []
    for bi in pick(len(frames)):
        if bi is None:
            batch.append(None)
            continue
        f = frames[bi]
        w, h = f.size
        rows = []
        for y in pick(h):
            if y is None:
                rows.append(None)
                continue
            row = []
            for x in pick(w):
                row.append(None if x is None else [v / 255.0 for v in f.getpixel((x, y))])
            rows.append(row)
        batch.append(rows)
    return tensor_repr(batch, summarized=True)


def _fmt_values(values: list[float]) -> tuple[str, int]:
    """torch's float formatter: integer mode prints ``0.``, otherwise 4 decimals, all right-aligned."""
    int_mode = all(float(v).is_integer() for v in values)
    texts = [f"{v:.0f}." if int_mode else f"{v:.4f}" for v in values]
    return ("int" if int_mode else "float"), max((len(t) for t in texts), default=1)


def tensor_repr(nested: list, summarized: bool = False) -> str:
    """Render a nested list (None = elided '...') like ``torch.Tensor.__repr__`` for 4-D float data."""
    flat: list[float] = []

    def collect(node: Any) -> None:
        if isinstance(node, list):
            for child in node:
                collect(child)
        elif isinstance(node, (int, float)):
            flat.append(float(node))

    collect(nested)
    mode, width = _fmt_values(flat)

    def fmt(v: float) -> str:
        text = f"{v:.0f}." if mode == "int" else f"{v:.4f}"
        return " " * (width - len(text)) + text

    def depth(node: Any) -> int:
        d = 0
        while isinstance(node, list):
            node = next((c for c in node if c is not None), None)
            d += 1
        return d

    def render(node: list, indent: int) -> str:
        dim = depth(node)
        if dim == 1:
            return "[" + ", ".join(" ..." if v is None else fmt(v) for v in node) + "]"
        parts = ["..." if child is None else render(child, indent + 1) for child in node]
        sep = "," + "\n" * (dim - 1) + " " * (indent + 1)
        return "[" + sep.join(parts) + "]"

    return "tensor(" + render(nested, len("tensor(")) + ")"
