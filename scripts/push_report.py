#!/usr/bin/env python3
"""After `make push`: which layers the push uploaded and which the registry already had, with their sizes.

    push_report.py --log PUSH_OUTPUT --image REF [--docker CLIENT]

The statuses come from `docker push`'s own output ("<id>: Pushed", "<id>: Layer already exists", where <id> is the
start of the layer's diff ID); the sizes (compressed, as pulled) from the pushed manifest (`docker manifest
inspect -v`), matched by position with the image's layers (`docker image inspect`). Standard library only.
Why: a cold RunPod worker pulls what was pushed; this says how much a push moved (docs/image.md, "Layer order").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

STATUS = re.compile(r"^([0-9a-f]{12}): (Pushed|Layer already exists|Mounted from .*)$")


def human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def docker_json(docker: str, *args: str) -> object | None:
    env = {**os.environ, "DOCKER_CLI_EXPERIMENTAL": "enabled"}  # `docker manifest` on 20.10 clients
    proc = subprocess.run([docker, *args], text=True, capture_output=True, env=env, timeout=120)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return None


def compressed_sizes(docker: str, ref: str) -> list[int] | None:
    """The layers' sizes as stored in the registry, bottom first (None when the manifest cannot be read)."""
    host = ref.split("/", 1)[0]
    insecure = ["--insecure"] if host.startswith(("127.", "localhost")) else []
    out = docker_json(docker, "manifest", "inspect", "-v", *insecure, ref)
    if isinstance(out, list):  # a manifest list: the first platform's
        out = out[0] if out else None
    if not isinstance(out, dict):
        return None
    manifest = out.get("SchemaV2Manifest") or out.get("OCIManifest") or {}
    return [int(layer["size"]) for layer in manifest.get("layers", [])] or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="push_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--log", required=True, help="the output of `docker push`")
    p.add_argument("--image", required=True, help="the pushed reference")
    p.add_argument("--docker", default="docker", help="the docker client")
    args = p.parse_args(argv)
    status: dict[str, str] = {}
    with open(args.log, encoding="utf-8", errors="replace") as log:
        for line in log:
            m = STATUS.match(line.strip())
            if m:
                status[m.group(1)] = "pushed" if m.group(2) == "Pushed" else "already there"
    layers = docker_json(args.docker, "image", "inspect", "-f", "{{json .RootFS.Layers}}", args.image) or []
    sizes = compressed_sizes(args.docker, args.image)
    if not isinstance(layers, list) or not layers:
        print(f">> push: cannot list the layers of {args.image}; see docker push's output above", file=sys.stderr)
        return 0
    if sizes is not None and len(sizes) != len(layers):
        sizes = None
    totals = {"pushed": [0, 0], "already there": [0, 0]}
    print(f">> pushed {args.image}: layers, bottom first (sizes compressed, as a pull downloads them"
          f"{'' if sizes else '; unknown: docker manifest inspect could not read the manifest'})")
    for i, diff_id in enumerate(layers):
        state = status.get(diff_id.removeprefix("sha256:")[:12], "?")
        size = sizes[i] if sizes else None
        if state in totals:
            totals[state][0] += 1
            totals[state][1] += size or 0
        print(f"   {i + 1:>3}  {state:<13}  {human(size):>9}  {diff_id[:19]}")
    print(f">> push: {totals['pushed'][0]} layer(s) uploaded ({human(totals['pushed'][1]) if sizes else '?'}), "
          f"{totals['already there'][0]} already in the registry ({human(totals['already there'][1]) if sizes else '?'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
