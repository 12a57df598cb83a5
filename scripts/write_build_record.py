#!/usr/bin/env python3
"""Write the image's build record from what the build baked in: the fetcher's and the installer's own records.

    write_build_record.py --out FILE [--models FILE] [--nodes FILE] [--comfyui-dir D] [--pyproject FILE]
                          [--comfyui-source git|local] [--comfyui-repo URL] [--comfyui-ref REF]

The Dockerfile runs it once, after the custom nodes are installed and before the workflows and the worker's code,
so a code-only rebuild keeps its layer. What changes with every build (the repository's revision and source, the
build time) is not in this file: the build passes them as BUILD_* build args, which become the image's ENV and
labels (metadata, no layer) and which the worker merges into ``/info``. The format is the one
``supervisor/build_record.py`` reads (docs/operations.md, "The build record and the image's labels").

Standard library only (and buildlib's shared module): it runs with any Python 3.11+ of the image, before the
worker's code is in it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from buildlib.common import without_credentials  # noqa: E402 - beside this script, standard library only

FORMAT = 1
VERSION_RE = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.MULTILINE)


def part(path: Path | None, key: str) -> list[dict[str, Any]]:
    """The list ``key`` of a fetcher's or installer's record; none when the build had nothing of the kind."""
    if path is None:
        return []
    body = json.loads(path.read_text(encoding="utf-8"))
    items = body.get(key) if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"{path}: no '{key}' list (written by fetch_models.py/install_nodes.py --record?)")
    return items


def comfyui(tree: Path | None, source: str, repo: str, ref: str) -> dict[str, str]:
    """ComfyUI's version (its comfyui_version.py), commit (.comfyui-commit) and, for a git source, repo and ref."""
    out: dict[str, str] = {}
    if tree is not None:
        version_file, commit_file = tree / "comfyui_version.py", tree / ".comfyui-commit"
        if version_file.is_file() and (match := VERSION_RE.search(version_file.read_text(encoding="utf-8"))):
            out["version"] = match.group(1)
        if commit_file.is_file():
            out["commit"] = commit_file.read_text(encoding="utf-8").strip()
    if source == "git":
        out.update({k: v for k, v in (("ref", ref), ("repo", without_credentials(repo))) if v})
    return out


def worker_version(pyproject: Path | None) -> dict[str, str]:
    if pyproject is None:
        return {}
    version = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {}).get("version")
    return {"version": version} if isinstance(version, str) and version else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="write_build_record.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the record to write")
    p.add_argument("--models", type=Path, help="fetch_models.py --record's file")
    p.add_argument("--nodes", type=Path, help="install_nodes.py --record's file")
    p.add_argument("--comfyui-dir", type=Path, help="the ComfyUI tree (comfyui_version.py, .comfyui-commit)")
    p.add_argument("--comfyui-source", choices=("git", "local"), default="git")
    p.add_argument("--comfyui-repo", default="")
    p.add_argument("--comfyui-ref", default="")
    p.add_argument("--pyproject", type=Path, help="the worker's pyproject.toml (its version)")
    args = p.parse_args(argv)
    try:
        record = {"format": FORMAT, "worker": worker_version(args.pyproject),
                  "comfyui": comfyui(args.comfyui_dir, args.comfyui_source, args.comfyui_repo, args.comfyui_ref),
                  "custom_nodes": part(args.nodes, "custom_nodes"), "models": part(args.models, "models")}
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError and json's errors are ValueErrors
        print(f"write_build_record: error: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    shown = record["comfyui"].get("version") or record["comfyui"].get("ref") or "version unknown"
    print(f">> build record {args.out}: worker {record['worker'].get('version', '?')}, ComfyUI {shown}, "
          f"{len(record['custom_nodes'])} node pack(s), {len(record['models'])} model(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
