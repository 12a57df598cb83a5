#!/usr/bin/env python3
"""Install the custom node packs of a custom_nodes.txt into a ComfyUI tree, then prove that every one imports.

    install_nodes.py --python /opt/venv/bin/python [--comfyui-dir D] [--list F] [--constraints F]
                     [--check server|quick|none] [--only-check] [--dry-run] [--record FILE]

For each pack: clone at the pinned commit (branch and tag names are refused unless ALLOW_UNPINNED=true),
install its requirements.txt and extras into ComfyUI's interpreter (``--python``, never this script's) with a
constraints file that holds torch/torchvision/torchaudio at their installed versions, run its install.py if any.
Then start ComfyUI itself and fail, naming each pack, if one logged ``IMPORT FAILED`` or registered no node
class: a pack whose requirements went into the wrong interpreter, or whose import raises, would otherwise be
skipped silently by ComfyUI at run time (worker-comfyui #237).

This file is the command line; the installer itself is in ``scripts/buildlib/`` (``buildlib/nodes/``),
standard library only, since it runs with ComfyUI's interpreter.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from buildlib.common import ConfigError  # noqa: E402
from buildlib.manifest import ManifestError, load_node_list  # noqa: E402
from buildlib.nodes.config import CHECK_MODES, NodesConfig, say  # noqa: E402
from buildlib.nodes.install import cmd_install  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = NodesConfig.from_env(os.environ)
    except ConfigError as exc:
        say(f"error: {exc}")
        return 2
    p = argparse.ArgumentParser(prog="install_nodes.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui-dir", type=Path, default=cfg.comfyui_dir, help=f"default {cfg.comfyui_dir}")
    p.add_argument("--python", default=cfg.python, help="ComfyUI's interpreter (default: COMFYUI_PYTHON; required)")
    p.add_argument("--list", type=Path, default=cfg.node_list, help=f"default {cfg.node_list}")
    p.add_argument("--constraints", type=Path, default=cfg.constraints, help="extra pip constraints for every pack")
    p.add_argument("--check", choices=CHECK_MODES, default=cfg.check, help=f"import check (default {cfg.check})")
    p.add_argument("--only-check", action="store_true", help="skip installing; only run the import check")
    p.add_argument("--dry-run", action="store_true", help="print the packs and exit")
    p.add_argument("--record", type=Path, default=None, metavar="FILE",
                   help="after a successful install, write each pack's name, URL and commit as JSON here")
    args = p.parse_args(argv)
    cfg = dataclasses.replace(cfg, comfyui_dir=args.comfyui_dir.resolve(), node_list=args.list,
                              constraints=args.constraints, check=args.check)
    try:
        packs = load_node_list(cfg.node_list, cfg.allow_unpinned)
    except ManifestError as exc:
        say(f"error: {exc}")
        return 2
    return cmd_install(cfg, args.python, packs, args.only_check, args.dry_run, args.record)


if __name__ == "__main__":
    sys.exit(main())
