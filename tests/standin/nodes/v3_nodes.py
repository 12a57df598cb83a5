"""Nodes ComfyUI 0.3.64 defines with the V3 schema (``comfy_api`` ``io.ComfyNode``).

They differ from V1 nodes in ways a client sees: ``/object_info`` writes combos as
``["COMBO", {"options": [...], "multiselect": false}]``, always carries ``output_tooltips``,
``deprecated``, ``experimental`` and ``api_node``, and ``display_name`` may be null; and their combo values
are **not** validated at ``POST /prompt`` (ImageBlend ``blend_mode: "nope"`` is accepted and fails at run
time with ``ValueError: Unsupported blend mode: nope``).
"""

from __future__ import annotations

from .values import Images


class V3Node:
    """Marker base: the info builder and validation treat subclasses as V3 nodes."""

    V3 = True
    DISPLAY_NAME: str | None = None
    DESCRIPTION = ""
    OUTPUT_TOOLTIPS: list | None = None


class ImageBlur(V3Node):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {}),
            "blur_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "execute"
    CATEGORY = "image/postprocessing"
    RELATIVE_PYTHON_MODULE = "comfy_extras.nodes_post_processing"
    OUTPUT_TOOLTIPS = [None]

    def execute(self, image, blur_radius, sigma):
        if blur_radius == 0:
            return (image,)
        from PIL import ImageFilter  # noqa: PLC0415
        radius = min(float(sigma), float(blur_radius))
        return (Images([f.filter(ImageFilter.GaussianBlur(radius=radius)) for f in image.frames]),)


BLEND_MODES = ["normal", "multiply", "screen", "overlay", "soft_light", "difference"]


class ImageBlend(V3Node):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image1": ("IMAGE", {}),
            "image2": ("IMAGE", {}),
            "blend_factor": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
            "blend_mode": ("COMBO", {"options": list(BLEND_MODES), "multiselect": False}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "execute"
    CATEGORY = "image/postprocessing"
    RELATIVE_PYTHON_MODULE = "comfy_extras.nodes_post_processing"
    OUTPUT_TOOLTIPS = [None]

    def execute(self, image1, image2, blend_factor, blend_mode):
        if blend_mode not in BLEND_MODES:
            raise ValueError(f"Unsupported blend mode: {blend_mode}")
        from PIL import Image, ImageChops  # noqa: PLC0415
        out = []
        for i, f1 in enumerate(image1.frames):
            f2 = image2.frames[min(i, len(image2.frames) - 1)]
            if f2.size != f1.size:
                f2 = f2.resize(f1.size, Image.BICUBIC)
            blended = _blend(f1, f2, blend_mode, ImageChops)
            out.append(Image.blend(f1, blended, float(blend_factor)))
        return (Images(out),)


def _blend(f1, f2, mode: str, ImageChops):
    """The blend modes of comfy_extras/nodes_post_processing.py, in 8-bit arithmetic."""
    if mode == "normal":
        return f2
    if mode == "multiply":
        return ImageChops.multiply(f1, f2)
    if mode == "screen":
        return ImageChops.screen(f1, f2)
    if mode == "overlay":
        return ImageChops.overlay(f1, f2)
    if mode == "soft_light":
        return ImageChops.soft_light(f1, f2)
    return ImageChops.subtract(f1, f2)  # ComfyUI's "difference" is img1 - img2, clamped at 0: not |img1 - img2|


NODE_CLASS_MAPPINGS = {
    "ImageBlur": ImageBlur,
    "ImageBlend": ImageBlend,
}

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
