"""Model-free image nodes, executed for real with Pillow (ComfyUI's nodes.py and comfy_extras equivalents).

Input schemas are ComfyUI 0.3.64's (see tests/fixtures/reference/object_info-subset.json and the recorded
``/object_info`` answers). Images are kept 8-bit, exact; where ComfyUI's float32 result lies just below the
exact value, so that a save node's truncation writes one less (ImageInvert: 200 -> 54, not 55), the batch
carries what a save node writes for each value (``Images.written``), computed like ComfyUI's float32 round trip
(``LoadImage`` /255, the node, ``SaveImage`` *255 then truncation).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct

import folder_paths
import runtime

from .values import Images, Masks

MAX_RESOLUTION = 16384


def _pil():
    """Import Pillow lazily: start-up must stay fast, and only executing nodes need it."""
    from PIL import Image, ImageOps, ImageSequence  # noqa: PLC0415
    from PIL.PngImagePlugin import PngInfo  # noqa: PLC0415
    return Image, ImageOps, ImageSequence, PngInfo


def _input_image_files() -> list[str]:
    """LoadImage's combo: image files directly in the input directory (not in subfolders), sorted."""
    input_dir = folder_paths.get_input_directory()
    try:
        files = [f for f in os.listdir(input_dir) if os.path.isfile(os.path.join(input_dir, f))]
    except FileNotFoundError:
        files = []
    return sorted(folder_paths.filter_files_content_types(files, ["image"]))


class EmptyImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "generate"
    CATEGORY = "image"

    def generate(self, width, height, batch_size=1, color=0):
        Image = _pil()[0]
        rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
        return (Images([Image.new("RGB", (width, height), rgb) for _ in range(batch_size)]),)


class LoadImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (_input_image_files(), {"image_upload": True})}}

    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    def load_image(self, image):
        Image, ImageOps, ImageSequence, _ = _pil()
        image_path = folder_paths.get_annotated_filepath(image)
        img = Image.open(image_path)
        frames, masks, size = [], [], None
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            if frame.mode == "I":
                frame = frame.point(lambda v: v * (1 / 255))
            rgb = frame.convert("RGB")
            if size is None:
                size = rgb.size
            if rgb.size != size:
                continue
            frames.append(rgb)
            masks.append(_alpha_mask(frame, Image, size))
            if img.format == "MPO":
                break
        return (Images(frames), Masks(masks))

    @classmethod
    def IS_CHANGED(cls, image):
        with open(folder_paths.get_annotated_filepath(image), "rb") as f:
            return hashlib.sha256(f.read()).digest().hex()

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        if not folder_paths.exists_annotated_filepath(image):
            return "Invalid image file: {}".format(image)
        return True


def _alpha_mask(frame, Image, size):
    """ComfyUI's mask: 1 - alpha where there is alpha, else an all-zero 64x64 mask."""
    if "A" in frame.getbands():
        return frame.getchannel("A").point(lambda a: 255 - a)
    if frame.mode == "P" and "transparency" in frame.info:
        return frame.convert("RGBA").getchannel("A").point(lambda a: 255 - a)
    return Image.new("L", (64, 64), 0)


class LoadImageMask:
    _color_channels = ["alpha", "red", "green", "blue"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (_input_image_files(), {"image_upload": True}),
                             "channel": (cls._color_channels,)}}

    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "load_image"

    def load_image(self, image, channel):
        Image, ImageOps, _, _ = _pil()
        img = ImageOps.exif_transpose(Image.open(folder_paths.get_annotated_filepath(image)))
        if img.getbands() != ("R", "G", "B", "A"):
            if img.mode == "I":
                img = img.point(lambda v: v * (1 / 255))
            img = img.convert("RGBA")
        c = channel[0].upper()
        if c in img.getbands():
            mask = img.getchannel(c)
            if c == "A":
                mask = mask.point(lambda a: 255 - a)
        else:
            mask = Image.new("L", (64, 64), 0)
        return (Masks([mask]),)

    @classmethod
    def IS_CHANGED(cls, image, channel):
        with open(folder_paths.get_annotated_filepath(image), "rb") as f:
            return hashlib.sha256(f.read()).digest().hex()

    @classmethod
    def VALIDATE_INPUTS(cls, image):
        if not folder_paths.exists_annotated_filepath(image):
            return "Invalid image file: {}".format(image)
        return True


def _f32(x: float) -> float:
    """``x`` rounded to float32, as torch and numpy hold image values."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _float32_lut(op) -> list[int]:
    """The 8-bit result of a float32 pixel operation, for each 8-bit input: the value is loaded as
    ``float32(v) / 255``, ``op`` runs in float32, and SaveImage writes ``uint8(clip(255 * x))`` (truncating)."""
    return [int(min(max(_f32(255.0 * _f32(op(_f32(v / 255.0)))), 0.0), 255.0)) for v in range(256)]


INVERT_LUT = _float32_lut(lambda x: 1.0 - x)  # ComfyUI: 1.0 - image; 200 -> 54 and 127 -> 127
# What a save node writes for each exact inverted value 255 - v.
INVERT_WRITTEN = [INVERT_LUT[255 - u] for u in range(256)]


class ImageInvert:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "invert"
    CATEGORY = "image"

    def invert(self, image):
        return (Images([f.point(lambda v: 255 - v) for f in image.frames], written=INVERT_WRITTEN),)


class ImageScale:
    upscale_methods = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
    crop_methods = ["disabled", "center"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "upscale_method": (cls.upscale_methods,),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "crop": (cls.crop_methods,),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    def upscale(self, image, upscale_method, width, height, crop):
        if width == 0 and height == 0:
            return (image,)
        Image = _pil()[0]
        _, src_h, src_w, _ = image.shape
        if width == 0:
            width = max(1, round(src_w * height / src_h))
        elif height == 0:
            height = max(1, round(src_h * width / src_w))
        resample = {"nearest-exact": Image.NEAREST, "bilinear": Image.BILINEAR, "area": Image.BOX,
                    "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}[upscale_method]
        out = []
        for f in image.frames:
            if crop == "center":
                f = _center_crop(f, width, height)
            out.append(f.resize((width, height), resample))
        return (Images(out),)


def _center_crop(frame, width: int, height: int):
    """comfy.utils.common_upscale's center crop: cut the source to the target aspect ratio first."""
    w, h = frame.size
    old_aspect, new_aspect = w / h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((w - w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((h - h * (old_aspect / new_aspect)) / 2)
    return frame.crop((x, y, w - x, h - y))


class SaveImage:
    def __init__(self):
        self.output_dir = folder_paths.get_output_directory()
        self.type = "output"
        self.prefix_append = ""
        self.compress_level = 4

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        filename_prefix += self.prefix_append
        _, h, w, _ = images.shape
        full_output_folder, filename, counter, subfolder, filename_prefix = folder_paths.get_save_image_path(
            filename_prefix, self.output_dir, w, h)
        results = []
        for batch_number, frame in enumerate(images.frames_to_write()):
            metadata = _png_metadata(prompt, extra_pnginfo)
            filename_with_batch_num = filename.replace("%batch_num%", str(batch_number))
            file = f"{filename_with_batch_num}_{counter:05}_.png"
            frame.save(os.path.join(full_output_folder, file), pnginfo=metadata, compress_level=self.compress_level)
            results.append({"filename": file, "subfolder": subfolder, "type": self.type})
            counter += 1
        return {"ui": {"images": results}}


def _png_metadata(prompt, extra_pnginfo):
    """The PNG text chunks ComfyUI writes: ``prompt`` and one per extra_pnginfo key (e.g. ``workflow``)."""
    if runtime.ARGS is not None and runtime.ARGS.disable_metadata:
        return None
    PngInfo = _pil()[3]
    metadata = PngInfo()
    if prompt is not None:
        metadata.add_text("prompt", json.dumps(prompt))
    if extra_pnginfo is not None:
        for key in extra_pnginfo:
            metadata.add_text(key, json.dumps(extra_pnginfo[key]))
    return metadata


class PreviewImage(SaveImage):
    def __init__(self):
        self.output_dir = folder_paths.get_temp_directory()
        self.type = "temp"
        self.prefix_append = "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
        self.compress_level = 1

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}


class SaveAnimatedWEBP:
    methods = {"default": 4, "fastest": 0, "slowest": 6}

    def __init__(self):
        self.output_dir = folder_paths.get_output_directory()
        self.type = "output"
        self.prefix_append = ""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE",),
            "filename_prefix": ("STRING", {"default": "ComfyUI"}),
            "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
            "lossless": ("BOOLEAN", {"default": True}),
            "quality": ("INT", {"default": 80, "min": 0, "max": 100}),
            "method": (list(cls.methods.keys()),),
        }, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image/animation"
    RELATIVE_PYTHON_MODULE = "comfy_extras.nodes_images"

    def save_images(self, images, fps, filename_prefix, lossless, quality, method, num_frames=0,
                    prompt=None, extra_pnginfo=None):
        method_id = self.methods.get(method)
        filename_prefix += self.prefix_append
        _, h, w, _ = images.shape
        full_output_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, self.output_dir, w, h)
        frames = images.frames_to_write()
        results = []
        num_frames = num_frames or len(frames)
        for i in range(0, len(frames), num_frames):
            file = f"{filename}_{counter:05}_.webp"
            frames[i].save(os.path.join(full_output_folder, file), save_all=True, duration=int(1000.0 / fps),
                           append_images=frames[i + 1:i + num_frames], lossless=lossless, quality=quality,
                           method=method_id)
            results.append({"filename": file, "subfolder": subfolder, "type": self.type})
            counter += 1
        return {"ui": {"images": results, "animated": (num_frames != 1,)}}


class SaveAnimatedPNG:
    def __init__(self):
        self.output_dir = folder_paths.get_output_directory()
        self.type = "output"
        self.prefix_append = ""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE",),
            "filename_prefix": ("STRING", {"default": "ComfyUI"}),
            "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
            "compress_level": ("INT", {"default": 4, "min": 0, "max": 9}),
        }, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image/animation"
    RELATIVE_PYTHON_MODULE = "comfy_extras.nodes_images"

    def save_images(self, images, fps, compress_level, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        filename_prefix += self.prefix_append
        _, h, w, _ = images.shape
        full_output_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, self.output_dir, w, h)
        file = f"{filename}_{counter:05}_.png"
        frames = images.frames_to_write()
        frames[0].save(os.path.join(full_output_folder, file), pnginfo=_png_metadata(prompt, extra_pnginfo),
                       compress_level=compress_level, save_all=True, duration=int(1000.0 / fps),
                       append_images=frames[1:])
        return {"ui": {"images": [{"filename": file, "subfolder": subfolder, "type": self.type}],
                       "animated": (True,)}}


NODE_CLASS_MAPPINGS = {
    "EmptyImage": EmptyImage,
    "LoadImage": LoadImage,
    "LoadImageMask": LoadImageMask,
    "ImageInvert": ImageInvert,
    "ImageScale": ImageScale,
    "SaveImage": SaveImage,
    "PreviewImage": PreviewImage,
    "SaveAnimatedWEBP": SaveAnimatedWEBP,
    "SaveAnimatedPNG": SaveAnimatedPNG,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadImage": "Load Image",
    "LoadImageMask": "Load Image (as Mask)",
    "ImageInvert": "Invert Image",
    "ImageScale": "Upscale Image",
    "SaveImage": "Save Image",
    "PreviewImage": "Preview Image",
}
