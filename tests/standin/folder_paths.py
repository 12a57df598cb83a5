"""ComfyUI's ``folder_paths`` module, reduced to what the stand-in and custom node packs use.

Custom node packs ``import folder_paths`` and call these functions exactly as they do in ComfyUI
(IPAdapter_plus registers its ``ipadapter`` key here), so names and semantics follow ComfyUI 0.3.64:
folder keys map to ``([paths], {extensions})``; listings are recursive, skip ``.git`` and are re-read when
a folder's mtime changes; the legacy names ``clip``/``unet`` map to ``text_encoders``/``diffusion_models``.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import time
from collections.abc import Iterable

supported_pt_extensions: set[str] = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}

base_path = os.path.dirname(os.path.realpath(__file__))
models_dir = os.path.join(base_path, "models")

output_directory = os.path.join(base_path, "output")
temp_directory = os.path.join(base_path, "temp")
input_directory = os.path.join(base_path, "input")
user_directory = os.path.join(base_path, "user")

filename_list_cache: dict[str, tuple[list[str], dict[str, float], float]] = {}

_LEGACY = {"clip": "text_encoders", "unet": "diffusion_models"}


def _init_defaults() -> None:
    """The built-in folder keys in ComfyUI's registration order (the order ``GET /models`` lists them)."""
    folder_names_and_paths.clear()
    pt = supported_pt_extensions
    folder_names_and_paths["checkpoints"] = ([os.path.join(models_dir, "checkpoints")], pt)
    folder_names_and_paths["configs"] = ([os.path.join(models_dir, "configs")], {".yaml"})
    folder_names_and_paths["loras"] = ([os.path.join(models_dir, "loras")], pt)
    folder_names_and_paths["vae"] = ([os.path.join(models_dir, "vae")], pt)
    folder_names_and_paths["text_encoders"] = (
        [os.path.join(models_dir, "text_encoders"), os.path.join(models_dir, "clip")], pt)
    folder_names_and_paths["diffusion_models"] = (
        [os.path.join(models_dir, "unet"), os.path.join(models_dir, "diffusion_models")], pt)
    folder_names_and_paths["clip_vision"] = ([os.path.join(models_dir, "clip_vision")], pt)
    folder_names_and_paths["style_models"] = ([os.path.join(models_dir, "style_models")], pt)
    folder_names_and_paths["embeddings"] = ([os.path.join(models_dir, "embeddings")], pt)
    folder_names_and_paths["diffusers"] = ([os.path.join(models_dir, "diffusers")], {"folder"})
    folder_names_and_paths["vae_approx"] = ([os.path.join(models_dir, "vae_approx")], pt)
    folder_names_and_paths["controlnet"] = (
        [os.path.join(models_dir, "controlnet"), os.path.join(models_dir, "t2i_adapter")], pt)
    folder_names_and_paths["gligen"] = ([os.path.join(models_dir, "gligen")], pt)
    folder_names_and_paths["upscale_models"] = ([os.path.join(models_dir, "upscale_models")], pt)
    folder_names_and_paths["custom_nodes"] = ([os.path.join(base_path, "custom_nodes")], set())
    folder_names_and_paths["hypernetworks"] = ([os.path.join(models_dir, "hypernetworks")], pt)
    folder_names_and_paths["photomaker"] = ([os.path.join(models_dir, "photomaker")], pt)
    folder_names_and_paths["classifiers"] = ([os.path.join(models_dir, "classifiers")], {""})
    folder_names_and_paths["model_patches"] = ([os.path.join(models_dir, "model_patches")], pt)
    folder_names_and_paths["audio_encoders"] = ([os.path.join(models_dir, "audio_encoders")], pt)


_init_defaults()


def set_base_path(path: str) -> None:
    """``--base-directory``: everything (models, custom_nodes, input, output, temp, user) moves with it."""
    global base_path, models_dir, output_directory, temp_directory, input_directory, user_directory
    base_path = os.path.abspath(path)
    models_dir = os.path.join(base_path, "models")
    output_directory = os.path.join(base_path, "output")
    temp_directory = os.path.join(base_path, "temp")
    input_directory = os.path.join(base_path, "input")
    user_directory = os.path.join(base_path, "user")
    _init_defaults()
    filename_list_cache.clear()


def map_legacy(folder_name: str) -> str:
    """``clip`` -> ``text_encoders``, ``unet`` -> ``diffusion_models``, as ComfyUI does."""
    return _LEGACY.get(folder_name, folder_name)


def set_output_directory(output_dir: str) -> None:
    global output_directory
    output_directory = output_dir


def set_temp_directory(temp_dir: str) -> None:
    global temp_directory
    temp_directory = temp_dir


def set_input_directory(input_dir: str) -> None:
    global input_directory
    input_directory = input_dir


def set_user_directory(user_dir: str) -> None:
    global user_directory
    user_directory = user_dir


def get_output_directory() -> str:
    return output_directory


def get_temp_directory() -> str:
    return temp_directory


def get_input_directory() -> str:
    return input_directory


def get_user_directory() -> str:
    return user_directory


def get_directory_by_type(type_name: str) -> str | None:
    """``output``/``temp``/``input`` -> that directory; anything else -> None (callers answer 400)."""
    if type_name == "output":
        return get_output_directory()
    if type_name == "temp":
        return get_temp_directory()
    if type_name == "input":
        return get_input_directory()
    return None


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """Split a ``name [output]`` style annotation off a file name."""
    if name.endswith("[output]"):
        return name[:-9], get_output_directory()
    if name.endswith("[input]"):
        return name[:-8], get_input_directory()
    if name.endswith("[temp]"):
        return name[:-7], get_temp_directory()
    return name, None


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    name, base_dir = annotated_filepath(name)
    if base_dir is None:
        base_dir = default_dir if default_dir is not None else get_input_directory()
    return os.path.join(base_dir, name)


def exists_annotated_filepath(name: str) -> bool:
    name, base_dir = annotated_filepath(name)
    if base_dir is None:
        base_dir = get_input_directory()
    return os.path.exists(os.path.join(base_dir, name))


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    """Add a search path to a folder key (creating the key, with no extension filter, if unknown)."""
    folder_name = map_legacy(folder_name)
    if folder_name in folder_names_and_paths:
        paths, _exts = folder_names_and_paths[folder_name]
        if full_folder_path in paths:
            if is_default and paths[0] != full_folder_path:
                paths.remove(full_folder_path)
                paths.insert(0, full_folder_path)
        elif is_default:
            paths.insert(0, full_folder_path)
        else:
            paths.append(full_folder_path)
    else:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())
    filename_list_cache.pop(folder_name, None)


def get_folder_paths(folder_name: str) -> list[str]:
    folder_name = map_legacy(folder_name)
    return folder_names_and_paths[folder_name][0][:]


def recursive_search(directory: str, excluded_dir_names: list[str] | None = None) -> tuple[list[str], dict[str, float]]:
    """Relative file names under ``directory`` and the mtimes of every directory visited."""
    if not os.path.isdir(directory):
        return [], {}
    excluded = set(excluded_dir_names or [])
    result: list[str] = []
    dirs: dict[str, float] = {}
    try:
        dirs[directory] = os.path.getmtime(directory)
    except FileNotFoundError:
        return [], {}
    for dirpath, subdirs, filenames in os.walk(directory, followlinks=True, topdown=True):
        subdirs[:] = [d for d in subdirs if d not in excluded]
        for file_name in filenames:
            result.append(os.path.relpath(os.path.join(dirpath, file_name), directory))
        for d in subdirs:
            path = os.path.join(dirpath, d)
            try:
                dirs[path] = os.path.getmtime(path)
            except FileNotFoundError:
                continue
    return result, dirs


def filter_files_extensions(files: Iterable[str], extensions: set[str]) -> list[str]:
    return sorted(f for f in files if os.path.splitext(f)[-1].lower() in extensions or len(extensions) == 0)


def get_full_path(folder_name: str, filename: str) -> str | None:
    """The first existing file of that name in the folder key's paths, or None."""
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for x in folder_names_and_paths[folder_name][0]:
        full_path = os.path.join(x, filename)
        if os.path.isfile(full_path):
            return full_path
        if os.path.islink(full_path):
            logging.warning("WARNING path %s exists but doesn't link anywhere, skipping.", full_path)
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    full_path = get_full_path(folder_name, filename)
    if full_path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full_path


def _get_filename_list(folder_name: str) -> tuple[list[str], dict[str, float], float]:
    folder_name = map_legacy(folder_name)
    output_list: set[str] = set()
    folders = folder_names_and_paths[folder_name]
    output_folders: dict[str, float] = {}
    for x in folders[0]:
        files, folders_all = recursive_search(x, excluded_dir_names=[".git"])
        output_list.update(filter_files_extensions(files, folders[1]))
        output_folders = {**output_folders, **folders_all}
    return sorted(output_list), output_folders, time.perf_counter()


def _cached_filename_list(folder_name: str) -> list[str] | None:
    """The cached listing unless a directory changed (mtime) or appeared since it was taken."""
    out = filename_list_cache.get(folder_name)
    if out is None:
        return None
    for x, time_modified in out[1].items():
        try:
            if os.path.getmtime(x) != time_modified:
                return None
        except FileNotFoundError:
            return None
    for x in folder_names_and_paths[folder_name][0]:
        if os.path.isdir(x) and x not in out[1]:
            return None
    return out[0]


def get_filename_list(folder_name: str) -> list[str]:
    """Sorted relative names of the model files of a folder key (KeyError for an unknown key)."""
    folder_name = map_legacy(folder_name)
    cached = _cached_filename_list(folder_name)
    if cached is not None:
        return list(cached)
    out = _get_filename_list(folder_name)
    filename_list_cache[folder_name] = out
    return list(out[0])


def filter_files_content_types(files: list[str], content_types: list[str]) -> list[str]:
    """Keep files whose guessed MIME major type is one of ``content_types`` (``image``, ``video``...)."""
    result = []
    for file in files:
        mime, _ = mimetypes.guess_type(file, strict=False)
        if mime is not None and mime.split("/")[0] in content_types:
            result.append(file)
    return result


def get_save_image_path(filename_prefix: str, output_dir: str, image_width: int = 0,
                        image_height: int = 0) -> tuple[str, str, int, str, str]:
    """ComfyUI's save-path rule: ``<prefix>_NNNNN_`` numbering per prefix, refusing escapes."""

    def map_filename(filename: str) -> tuple[int, str]:
        prefix_len = len(os.path.basename(filename_prefix))
        prefix = filename[:prefix_len + 1]
        try:
            digits = int(filename[prefix_len + 1:].split("_")[0])
        except ValueError:
            digits = 0
        return digits, prefix

    def compute_vars(text: str, width: int, height: int) -> str:
        text = text.replace("%width%", str(width)).replace("%height%", str(height))
        now = time.localtime()
        text = text.replace("%year%", str(now.tm_year))
        text = text.replace("%month%", str(now.tm_mon).zfill(2))
        text = text.replace("%day%", str(now.tm_mday).zfill(2))
        text = text.replace("%hour%", str(now.tm_hour).zfill(2))
        text = text.replace("%minute%", str(now.tm_min).zfill(2))
        return text.replace("%second%", str(now.tm_sec).zfill(2))

    if "%" in filename_prefix:
        filename_prefix = compute_vars(filename_prefix, image_width, image_height)

    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    full_output_folder = os.path.join(output_dir, subfolder)

    if os.path.commonpath((output_dir, os.path.abspath(full_output_folder))) != output_dir:
        err = ("**** ERROR: Saving image outside the output folder is not allowed."
               + "\n full_output_folder: " + os.path.abspath(full_output_folder)
               + "\n         output_dir: " + output_dir
               + "\n         commonpath: " + os.path.commonpath((output_dir, os.path.abspath(full_output_folder))))
        logging.error(err)
        raise Exception(err)

    try:
        counter = max(filter(lambda a: os.path.normcase(a[1][:-1]) == os.path.normcase(filename) and a[1][-1] == "_",
                             map(map_filename, os.listdir(full_output_folder))))[0] + 1
    except ValueError:
        counter = 1
    except FileNotFoundError:
        os.makedirs(full_output_folder, exist_ok=True)
        counter = 1
    return full_output_folder, filename, counter, subfolder, filename_prefix
