"""The node registry, ``/object_info`` entries and custom node loading, as ComfyUI's ``nodes.py`` does them.

Custom node packs may ``import nodes`` (for ``NODE_CLASS_MAPPINGS`` or ``MAX_RESOLUTION``) exactly as in
ComfyUI. Packs are imported one by one; a pack that raises is logged with its traceback,
``Cannot import <path> module for custom nodes: <error>`` and ``(IMPORT FAILED)`` in the import-times block,
and the server starts without its classes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
import traceback

import folder_paths

from . import image_nodes, model_nodes, v3_nodes

MAX_RESOLUTION = 16384

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
LOADED_MODULE_DIRS: dict[str, str] = {}
EXTENSION_WEB_DIRS: dict[str, str] = {}


def init_builtin_nodes() -> None:
    """Register the stand-in's core classes (ComfyUI's nodes.py plus the comfy_extras ones it needs)."""
    for module in (model_nodes, image_nodes, v3_nodes):
        NODE_CLASS_MAPPINGS.update(module.NODE_CLASS_MAPPINGS)
        NODE_DISPLAY_NAME_MAPPINGS.update(module.NODE_DISPLAY_NAME_MAPPINGS)


def is_v3(cls: type) -> bool:
    return bool(getattr(cls, "V3", False))


def is_output_node(cls: type) -> bool:
    return getattr(cls, "OUTPUT_NODE", False) is True


def node_info(node_class: str) -> dict:
    """One ``/object_info`` entry, with the key order ComfyUI's server writes (V1 and V3 differ)."""
    obj_class = NODE_CLASS_MAPPINGS[node_class]
    input_types = obj_class.INPUT_TYPES()
    info: dict = {
        "input": input_types,
        "input_order": {key: list(value.keys()) for key, value in input_types.items()},
        "output": obj_class.RETURN_TYPES,
        "output_is_list": getattr(obj_class, "OUTPUT_IS_LIST", [False] * len(obj_class.RETURN_TYPES)),
        "output_name": getattr(obj_class, "RETURN_NAMES", obj_class.RETURN_TYPES),
    }
    if is_v3(obj_class):
        return _v3_tail(info, node_class, obj_class)
    info["name"] = node_class
    info["display_name"] = NODE_DISPLAY_NAME_MAPPINGS.get(node_class, node_class)
    info["description"] = getattr(obj_class, "DESCRIPTION", "")
    info["python_module"] = getattr(obj_class, "RELATIVE_PYTHON_MODULE", "nodes")
    info["category"] = getattr(obj_class, "CATEGORY", "sd")
    info["output_node"] = is_output_node(obj_class)
    if hasattr(obj_class, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = obj_class.OUTPUT_TOOLTIPS
    if getattr(obj_class, "DEPRECATED", False):
        info["deprecated"] = True
    if getattr(obj_class, "EXPERIMENTAL", False):
        info["experimental"] = True
    if hasattr(obj_class, "API_NODE"):
        info["api_node"] = obj_class.API_NODE
    return info


def _v3_tail(info: dict, node_class: str, obj_class: type) -> dict:
    """The fields a V3 schema always writes (observed for ImageBlur)."""
    info["output_tooltips"] = list(obj_class.OUTPUT_TOOLTIPS or [None] * len(obj_class.RETURN_TYPES))
    info["name"] = node_class
    info["display_name"] = obj_class.DISPLAY_NAME
    info["description"] = obj_class.DESCRIPTION
    info["python_module"] = getattr(obj_class, "RELATIVE_PYTHON_MODULE", "nodes")
    info["category"] = obj_class.CATEGORY
    info["output_node"] = is_output_node(obj_class)
    info["deprecated"] = False
    info["experimental"] = False
    info["api_node"] = False
    return info


def get_module_name(module_path: str) -> str:
    base = os.path.basename(module_path)
    if os.path.isfile(module_path):
        base = os.path.splitext(base)[0]
    return base


def load_custom_node(module_path: str, ignore: set[str], module_parent: str = "custom_nodes") -> bool:
    """Import one pack (directory with __init__.py, or a .py file) and register its classes."""
    module_name = get_module_name(module_path)
    if os.path.isfile(module_path):
        sys_module_name = os.path.splitext(module_path)[0]
        init_file, module_dir = module_path, os.path.split(module_path)[0]
    else:
        sys_module_name = module_path.replace(".", "_x_")
        init_file, module_dir = os.path.join(module_path, "__init__.py"), module_path
    try:
        logging.debug("Trying to load custom node %s", module_path)
        spec = importlib.util.spec_from_file_location(sys_module_name, init_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[sys_module_name] = module
        spec.loader.exec_module(module)
        LOADED_MODULE_DIRS[module_name] = os.path.abspath(module_dir)
        web_dir = getattr(module, "WEB_DIRECTORY", None)
        if web_dir is not None:
            EXTENSION_WEB_DIRS[module_name] = os.path.abspath(os.path.join(module_dir, web_dir))
        mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
        if mappings is None:
            logging.warning(f"Skip {module_path} module for custom nodes due to the lack of NODE_CLASS_MAPPINGS "
                            "or NODES_LIST (need one).")
            return False
        for name, node_cls in mappings.items():
            if name not in ignore:
                NODE_CLASS_MAPPINGS[name] = node_cls
                node_cls.RELATIVE_PYTHON_MODULE = f"{module_parent}.{get_module_name(module_path)}"
        display = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None)
        if display is not None:
            NODE_DISPLAY_NAME_MAPPINGS.update(display)
        return True
    except Exception as e:  # noqa: BLE001 - ComfyUI swallows every import error of a pack
        logging.warning(traceback.format_exc())
        logging.warning(f"Cannot import {module_path} module for custom nodes: {e}")
        return False


def init_external_custom_nodes(disable_all: bool = False, whitelist: list[str] | None = None) -> None:
    """Load every pack of every ``custom_nodes`` path and log the import-times block like ComfyUI."""
    base_node_names = set(NODE_CLASS_MAPPINGS.keys())
    import_times: list[tuple[float, str, bool]] = []
    for custom_node_path in folder_paths.get_folder_paths("custom_nodes"):
        try:
            possible_modules = sorted(os.listdir(os.path.realpath(custom_node_path)))
        except FileNotFoundError:
            continue
        if "__pycache__" in possible_modules:
            possible_modules.remove("__pycache__")
        for possible_module in possible_modules:
            module_path = os.path.join(custom_node_path, possible_module)
            if os.path.isfile(module_path) and os.path.splitext(module_path)[1] != ".py":
                continue
            if module_path.endswith(".disabled"):
                continue
            if disable_all and possible_module not in (whitelist or []):
                logging.info(f"Skipping {possible_module} due to disable_all_custom_nodes and whitelist_custom_nodes")
                continue
            started = time.perf_counter()
            ok = load_custom_node(module_path, base_node_names)
            import_times.append((time.perf_counter() - started, module_path, ok))
    if import_times:
        logging.info("\nImport times for custom nodes:")
        for seconds, path, ok in sorted(import_times):
            logging.info("{:6.1f} seconds{}: {}".format(seconds, "" if ok else " (IMPORT FAILED)", path))
        logging.info("")
