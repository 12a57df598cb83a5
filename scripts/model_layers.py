#!/usr/bin/env python3
"""Write the Dockerfile `make build` uses: docker/Dockerfile with its model block replaced by one fetch stage and
one image layer per model file (or per small group of files), generated from models.yaml.

    model_layers.py --manifest models.yaml --dockerfile docker/Dockerfile --out build/model-layers
                    [--group-mb N]

Why generated: a Dockerfile cannot loop over a manifest, and one layer per model is what lets a registry and a
worker keep every model they already have when anything else changes (docs/image.md, "Model layers"). Each model
gets a stage of its own whose only input is its own entry (``<out>/<stage>.json``, a one-entry models.yaml): adding
or changing one entry fetches only that entry, and every other stage stays cached, with the same bytes, so its
layer keeps its digest. The output lives under the ignored ``build/`` folder of the build context and is written
by every `make build`; docker/Dockerfile alone still builds (all models in one layer, as before).

``--group-mb N``: consecutive entries whose ``size`` is known and together at most N MiB share one layer (fewer,
smaller layers for many tiny files); 0, the default, gives every file its own layer. Standard library + PyYAML.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from buildlib.manifest import ManifestError, load_manifest  # noqa: E402

PROG = "model_layers"
STAGES_BEGIN, STAGES_END = "# @model-stages-begin", "# @model-stages-end"
LAYERS_BEGIN, LAYERS_END = "# @model-layers-begin", "# @model-layers-end"
RECORD_STAGE = "models-record"


def groups(entries: list[dict], sizes: list[int | None], group_bytes: int) -> list[list[int]]:
    """Indexes of the entries per layer, in manifest order: one each, or consecutive sized ones up to the limit."""
    out: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        fits = group_bytes > 0 and size is not None and out and total + size <= group_bytes \
            and all(sizes[j] is not None for j in out[-1])
        if fits:
            out[-1].append(i)
            total += size or 0
        else:
            out.append([i])
            total = size or 0
    return out


def stage_name(entries: list[dict], members: list[int]) -> str:
    """A stage name from the first entry's name (Dockerfile stage names: lower-case letters, digits, - _ .)."""
    slug = re.sub(r"[^a-z0-9_.-]+", "-", str(entries[members[0]]["name"]).lower()).strip("-.") or "model"
    return f"model-{slug}" + (f"-and-{len(members) - 1}-more" if len(members) > 1 else "")


def stage_text(name: str, fragment: str) -> str:
    """One model stage: fetch its own entries into /out/models, every timestamp set to 0 so that the same entry
    gives the same bytes (and the same layer digest) even when the stage has to run again."""
    return f"""FROM fetch-tools AS {name}
ARG HF_ENDPOINT
ARG CIVITAI_ENDPOINT
COPY {fragment} /opt/build/models.json
RUN --mount=type=secret,id=HF_TOKEN --mount=type=secret,id=CIVITAI_TOKEN \\
    /opt/build/fetch-layer.sh /opt/build/models.json /out/models /out/records/{name}.json
"""


def generate(raw: dict, entries_sizes: list[int | None], group_bytes: int, out: Path,
             context: Path) -> tuple[str, str]:
    """Write the fragments into ``out``; return the stages block and the layers block of the Dockerfile."""
    entries = raw.get("models") or []
    top = {k: v for k, v in raw.items() if k != "models"}
    stages, layers, records, names = [], [], [], []
    for members in groups(entries, entries_sizes, group_bytes):
        name = stage_name(entries, members)
        fragment = out / f"{name}.json"
        fragment.write_text(json.dumps({**top, "models": [entries[i] for i in members]}, indent=1, sort_keys=True,
                                       default=str) + "\n")
        rel = fragment.relative_to(context).as_posix()
        stages.append(stage_text(name, rel))
        layers.append(f"COPY --from={name} /out/models/ /opt/ComfyUI/models/")
        records.append(f"COPY --from={name} /out/records/ /out/records/")
        names.append(name)
    record = [f"FROM system AS {RECORD_STAGE}", "COPY docker/merge_model_records.py /opt/build/",
              "RUN mkdir -p /out/records", *records,
              "RUN python3 /opt/build/merge_model_records.py /out/records /opt/build/models-record.json "
              + " ".join(names)]
    return "\n".join([*stages, *record]) + "\n", "\n".join(layers) + ("\n" if layers else "")


def replace_block(text: str, begin: str, end: str, block: str, path: Path) -> str:
    try:
        head, rest = text.split(begin + "\n", 1)
        _, tail = rest.split(end + "\n", 1)
    except ValueError:
        raise SystemExit(f"{PROG}: error: {path} has no '{begin}' ... '{end}' block; restore it from git") from None
    return f"{head}{begin}\n{block}{end}\n{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, required=True, help="models.yaml (inside the build context)")
    p.add_argument("--dockerfile", type=Path, required=True, help="docker/Dockerfile")
    p.add_argument("--context", type=Path, default=Path("."), help="the build context (default .)")
    p.add_argument("--out", type=Path, required=True, help="a folder inside the context; replaced entirely")
    p.add_argument("--group-mb", type=int, default=0, help="share a layer among sized files up to N MiB (0: never)")
    args = p.parse_args(argv)
    if args.group_mb < 0:
        print(f"{PROG}: error: --group-mb (MODEL_GROUP_MB) is {args.group_mb}; give 0 (one layer per file) or more",
              file=sys.stderr)
        return 2
    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    import yaml

    raw = yaml.safe_load(args.manifest.read_text(encoding="utf-8"))
    context, out = args.context.resolve(), args.out.resolve()
    if not out.is_relative_to(context):
        print(f"{PROG}: error: --out {out} is not inside the build context {context}", file=sys.stderr)
        return 2
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    stages, layers = generate(raw, [e.size for e in manifest.entries], args.group_mb << 20, out, context)
    text = args.dockerfile.read_text(encoding="utf-8")
    text = replace_block(text, STAGES_BEGIN, STAGES_END, stages, args.dockerfile)
    text = replace_block(text, LAYERS_BEGIN, LAYERS_END, layers, args.dockerfile)
    header = (f"# GENERATED by scripts/model_layers.py from {args.dockerfile} and {args.manifest} "
              f"(sha256 {hashlib.sha256(args.manifest.read_bytes()).hexdigest()[:16]}): edit those, not this.\n")
    (out / "Dockerfile").write_text(header + text, encoding="utf-8")
    n = len(manifest.entries)
    print(f">> model layers: {layers.count('COPY')} layer(s) for {n} model file(s) -> {out / 'Dockerfile'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
