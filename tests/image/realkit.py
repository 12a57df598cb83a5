"""Pieces of the real image test: the upstream ComfyUI and node packs, the pinned torch triple from pip's default
index, the generated tiny models served by the loopback hub.

The build is the real ``docker/Dockerfile`` through ``make build``, like the stand-in variant (imagekit.py), with
these differences: ComfyUI is the upstream source unpacked into the staged build context (COMFYUI_SOURCE=local),
each pack of ``custom_nodes.txt`` (IPAdapter_plus) is cloned by the node installer in the build from a
``git daemon`` on loopback that serves its bundle, at the commit ``custom_nodes.txt`` pins, and torch is real.
The inputs are found by ``scripts/real_comfyui.py`` in ``../shared/upstream/`` (never copied into the
repository); the models are made by ``tests/helpers/tiny_models.py`` with the prepared real ComfyUI's torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.real_comfyui import builder, find_real_comfyui, models_manifest, not_prepared_message, \
    tiny_models_dir
from tests.hubserver.harness import HubServer
from tests.image.imagekit import GitDaemon

COMFYUI_IN_CONTEXT = "upstream/ComfyUI"  # where the staged build context holds the unpacked source
TORCH_PACKAGES = " ".join(builder().TORCH_PINS)  # the triple known to work with this ComfyUI
REAL_VARIANT = (
    "--build-arg COMFYUI_SOURCE=local",
    f"--build-arg COMFYUI_LOCAL_DIR={COMFYUI_IN_CONTEXT}",
    # no TORCH_PACKAGES, no TORCH_INDEX_URL: the Dockerfile's defaults, the pinned triple from pip's default index
    "--build-arg SYSTEM_PACKAGES=",
)
MODELS_REPO = "tiny/real-models"  # the hub repository that serves the generated models


@dataclass(frozen=True)
class Upstream:
    """The inputs of the real build, as scripts/real_comfyui.py reads them (its Inputs)."""

    inputs: Any

    @property
    def pins(self) -> dict[str, str]:
        """Pack name -> the commit custom_nodes.txt pins."""
        return {pack.name: pack.ref for pack in self.inputs.packs}


def read_upstream() -> tuple[Upstream | None, str]:
    """The upstream inputs, or None and why they cannot be read."""
    b = builder()
    try:
        return Upstream(b.read_inputs(b.Options.from_env(os.environ))), ""
    except b.BuildError as exc:
        return None, str(exc)


def unpack_comfyui(upstream: Upstream, dest: Path) -> Path:
    return builder().unpack(upstream.inputs.tarball, dest)


def serve_packs(upstream: Upstream, daemon: GitDaemon) -> str:
    """Every pack's bundle served by ``daemon``; returns the custom_nodes.txt naming them at the same pins."""
    for pack in upstream.inputs.packs:
        daemon.add(pack.name, upstream.inputs.bundles[pack.name])
    return "".join(" ".join([f"{daemon.url(p.name)}@{p.ref}", *p.extras]) + "\n" for p in upstream.inputs.packs)


def generated_models() -> tuple[dict[str, bytes] | None, str]:
    """The tiny models (relative path -> bytes), made once per machine with the real ComfyUI's torch; or None
    and why not (the real ComfyUI has not been prepared: `make real-comfyui`)."""
    real = find_real_comfyui()
    if real is None:
        return None, not_prepared_message()
    models = tiny_models_dir(real)
    files = models_manifest(models)["files"]
    return {name: (models / name).read_bytes() for name in sorted(files)}, ""


def serve_models(server: HubServer, models: dict[str, bytes]) -> str:
    """Put every model into the hub's repository; returns the models.yaml that fetches them, sha256 checked."""
    lines = ["# models.yaml of the real image test: the generated tiny models on the loopback hub server",
             "version: 1", "models:"]
    for dest, data in models.items():
        folder, filename = dest.split("/", 1)
        sha = server.add_hf(MODELS_REPO, dest, data)
        lines += [f"  - name: {Path(filename).stem.lower().replace('_', '-')}",
                  f"    folder: {folder}", f"    filename: {filename}",
                  f"    hf: {{repo: {MODELS_REPO}, file: {dest}, revision: main}}",
                  f'    sha256: "{sha}"']
    return "\n".join(lines) + "\n"
