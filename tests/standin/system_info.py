"""``/system_stats`` and the version strings ComfyUI 0.3.64 reports (on ``--cpu``: one ``cpu`` device
whose VRAM fields equal system RAM, as observed)."""

from __future__ import annotations

import os
import sys

COMFYUI_VERSION = "0.3.64"
REQUIRED_FRONTEND_VERSION = "1.27.10"
TEMPLATES_VERSION = "0.1.95"
PYTORCH_VERSION = "2.14.1+cu130"

# What the bundled frontend package (comfyui-frontend-package 1.27.10) lists under /extensions.
FRONTEND_CORE_EXTENSIONS = (
    "/extensions/core/groupNode.js", "/extensions/core/maskEditorOld.js", "/extensions/core/clipspace.js",
    "/extensions/core/maskEditorLayerFilenames.js", "/extensions/core/widgetInputs.js",
    "/extensions/core/groupNodeManage.js", "/extensions/core/load3d/NodeStorage.js",
    "/extensions/core/load3d/ViewHelperManager.js", "/extensions/core/load3d/ControlsManager.js",
    "/extensions/core/load3d/RecordingManager.js", "/extensions/core/load3d/ModelExporter.js",
    "/extensions/core/load3d/AnimationManager.js", "/extensions/core/load3d/LoaderManager.js",
    "/extensions/core/load3d/LightingManager.js", "/extensions/core/load3d/CameraManager.js",
    "/extensions/core/load3d/SceneModelManager.js", "/extensions/core/load3d/SceneManager.js",
    "/extensions/core/load3d/PreviewManager.js", "/extensions/core/load3d/EventManager.js",
)


def memory() -> tuple[int, int]:
    """(total, available) RAM in bytes from /proc/meminfo (psutil's numbers, without importing psutil)."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total = values.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = values.get("MemAvailable", values.get("MemFree", total))
    return total, free


def system_stats() -> dict:
    ram_total, ram_free = memory()
    return {
        "system": {
            "os": os.name,
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": COMFYUI_VERSION,
            "required_frontend_version": REQUIRED_FRONTEND_VERSION,
            "installed_templates_version": TEMPLATES_VERSION,
            "required_templates_version": TEMPLATES_VERSION,
            "python_version": sys.version,
            "pytorch_version": PYTORCH_VERSION,
            "embedded_python": os.path.split(os.path.split(sys.executable)[0])[1] == "python_embeded",
            "argv": sys.argv,
        },
        "devices": [{
            "name": "cpu",
            "type": "cpu",
            "index": None,
            "vram_total": ram_total,
            "vram_free": ram_free,
            "torch_vram_total": ram_total,
            "torch_vram_free": ram_free,
        }],
    }
