"""``/upload/image``, ``/upload/mask``, ``/view`` and ``/view_metadata``, with ComfyUI's exact rules.

Upload naming: same name + identical bytes keeps the name (hash compare, no new file); same name +
different bytes gets ``name (1).png``, ``name (2).png``...; ``overwrite=true|1`` replaces in place; a
subfolder escaping the target directory is a 400; an unknown ``type`` raises inside the handler (plain-text
500, as ComfyUI's UnboundLocalError does). ``/view``: 400 for missing/absolute/``..`` names or an unknown
type, 403 for a subfolder escape, 404 for a missing file.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
from io import BytesIO
from typing import Any, Callable

from aiohttp import web

import folder_paths


def get_dir_by_type(dir_type: str | None) -> tuple[str, str]:
    if dir_type is None:
        dir_type = "input"
    if dir_type == "input":
        return folder_paths.get_input_directory(), dir_type
    if dir_type == "temp":
        return folder_paths.get_temp_directory(), dir_type
    if dir_type == "output":
        return folder_paths.get_output_directory(), dir_type
    raise UnboundLocalError("cannot access local variable 'type_dir' where it is not associated with a value")


def compare_image_hash(filepath: str, image: Any, hashing: str) -> bool:
    """True when the existing file has exactly the uploaded bytes (ComfyUI fix #3465)."""
    if not os.path.exists(filepath):
        return False
    a, b = hashlib.new(hashing), hashlib.new(hashing)
    with open(filepath, "rb") as f:
        a.update(f.read())
    b.update(image.file.read())
    image.file.seek(0)
    return a.hexdigest() == b.hexdigest()


def image_upload(post: Any, image_save_function: Callable | None = None, hashing: str = "sha256") -> web.Response:
    image = post.get("image")
    overwrite = post.get("overwrite")
    upload_dir, image_upload_type = get_dir_by_type(post.get("type"))
    if not (image and image.file):  # a part sent without a filename is a str: AttributeError, a 500, as in ComfyUI
        return web.Response(status=400)
    filename = image.filename
    if not filename:
        return web.Response(status=400)
    subfolder = post.get("subfolder", "")
    full_output_folder = os.path.join(upload_dir, os.path.normpath(subfolder))
    filepath = os.path.abspath(os.path.join(full_output_folder, filename))
    if os.path.commonpath((upload_dir, filepath)) != upload_dir:
        return web.Response(status=400)
    os.makedirs(full_output_folder, exist_ok=True)
    split = os.path.splitext(filename)
    is_duplicate = False
    if not (overwrite is not None and overwrite in ("true", "1")):
        i = 1
        while os.path.exists(filepath):
            if compare_image_hash(filepath, image, hashing):
                is_duplicate = True
                break
            filename = f"{split[0]} ({i}){split[1]}"
            filepath = os.path.join(full_output_folder, filename)
            i += 1
    if not is_duplicate:
        if image_save_function is not None:
            image_save_function(image, post, filepath)
        else:
            with open(filepath, "wb") as f:
                f.write(image.file.read())
    return web.json_response({"name": filename, "subfolder": subfolder, "type": image_upload_type})


def mask_save_function(image: Any, post: Any, filepath: str) -> None:
    """Write the referenced original image with its alpha replaced by the uploaded mask's alpha."""
    from PIL import Image  # noqa: PLC0415
    from PIL.PngImagePlugin import PngInfo  # noqa: PLC0415
    original_ref = json.loads(post.get("original_ref"))
    filename, output_dir = folder_paths.annotated_filepath(original_ref["filename"])
    if not filename or filename[0] == "/" or ".." in filename:
        return
    if output_dir is None:
        output_dir = folder_paths.get_directory_by_type(original_ref.get("type", "output"))
    if output_dir is None:
        return
    if original_ref.get("subfolder", "") != "":
        full_output_dir = os.path.join(output_dir, original_ref["subfolder"])
        if os.path.commonpath((os.path.abspath(full_output_dir), output_dir)) != output_dir:
            return
        output_dir = full_output_dir
    file = os.path.join(output_dir, filename)
    if os.path.isfile(file):
        with Image.open(file) as original_pil:
            metadata = PngInfo()
            for key, value in getattr(original_pil, "text", {}).items():
                metadata.add_text(key, value)
            original_pil = original_pil.convert("RGBA")
            mask_pil = Image.open(image.file).convert("RGBA")
            original_pil.putalpha(mask_pil.getchannel("A"))
            original_pil.save(filepath, compress_level=4, pnginfo=metadata)


def view(query: Any) -> web.StreamResponse:
    if "filename" not in query:
        return web.Response(status=404)
    filename, output_dir = folder_paths.annotated_filepath(query["filename"])
    if not filename or filename[0] == "/" or ".." in filename:
        return web.Response(status=400)
    if output_dir is None:
        output_dir = folder_paths.get_directory_by_type(query.get("type", "output"))
    if output_dir is None:
        return web.Response(status=400)
    if "subfolder" in query:
        full_output_dir = os.path.join(output_dir, query["subfolder"])
        if os.path.commonpath((os.path.abspath(full_output_dir), output_dir)) != output_dir:
            return web.Response(status=403)
        output_dir = full_output_dir
    filename = os.path.basename(filename)
    file = os.path.join(output_dir, filename)
    if not os.path.isfile(file):
        return web.Response(status=404)
    headers = {"Content-Disposition": f'filename="{filename}"'}
    if "preview" in query:
        return _preview(file, query, headers)
    channel = query.get("channel", "rgba")
    if channel == "rgb":
        return _png_response(_rgb(file), headers)
    if channel == "a":
        return _png_response(_alpha(file), headers)
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}:
        content_type = "application/octet-stream"
    return web.FileResponse(file, headers={**headers, "Content-Type": content_type})


def _preview(file: str, query: Any, headers: dict) -> web.Response:
    from PIL import Image  # noqa: PLC0415
    with Image.open(file) as img:
        info = query["preview"].split(";")
        image_format = info[0]
        if image_format not in ("webp", "jpeg") or "a" in query.get("channel", ""):
            image_format = "webp"
        quality = int(info[-1]) if info[-1].isdigit() else 90
        if image_format == "jpeg" or query.get("channel", "") == "rgb":
            img = img.convert("RGB")
        buffer = BytesIO()
        img.save(buffer, format=image_format, quality=quality)
    return web.Response(body=buffer.getvalue(), content_type=f"image/{image_format}", headers=headers)


def _rgb(file: str):
    from PIL import Image  # noqa: PLC0415
    with Image.open(file) as img:
        if img.mode == "RGBA":
            r, g, b, _a = img.split()
            return Image.merge("RGB", (r, g, b))
        return img.convert("RGB")


def _alpha(file: str):
    from PIL import Image  # noqa: PLC0415
    with Image.open(file) as img:
        a = img.split()[-1] if img.mode == "RGBA" else Image.new("L", img.size, 255)
        alpha_img = Image.new("RGBA", img.size)
        alpha_img.putalpha(a)
        return alpha_img


def _png_response(img, headers: dict) -> web.Response:
    buffer = BytesIO()
    img.save(buffer, format="PNG")
    return web.Response(body=buffer.getvalue(), content_type="image/png", headers=headers)


def view_metadata(folder_name: str, filename: str | None) -> web.Response:
    """The ``__metadata__`` of a .safetensors model file (its JSON header), else 404."""
    if filename is None or not filename.endswith(".safetensors"):
        return web.Response(status=404)
    if folder_name not in folder_paths.folder_names_and_paths:
        return web.Response(status=404)
    path = folder_paths.get_full_path(folder_name, filename)
    if path is None:
        return web.Response(status=404)
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return web.Response(status=404)
    meta = header.get("__metadata__")
    if meta is None:
        return web.Response(status=404)
    return web.json_response(meta)
