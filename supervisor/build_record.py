"""The image's build record: what the build baked in (ComfyUI, node packs, models), and the labels that say the same.

The image build writes one JSON file (``BUILD_RECORD_FILE``, ``/opt/worker/build-record.json`` in the image);
``GET /info`` reads it, and the image carries the same facts as OCI labels (:func:`labels`), so ``docker inspect``
tells what is inside without running it. Format (``docs/operations.md``, "The build record")::

    {"format": 1, "built_at": "2026-01-31T12:00:00Z",
     "worker": {"version": "0.1.0", "revision": "<git commit>", "source": "<repository URL>"},
     "comfyui": {"version": "0.3.64", "ref": "v0.3.64", "commit": "<40 hex>", "repo": "<URL>"},
     "custom_nodes": [{"name": "ComfyUI_IPAdapter_plus", "url": "<URL>", "commit": "<40 hex>"}],
     "models": [{"name": "sdxl-base", "path": "checkpoints/sd_xl_base_1.0.safetensors", "sha256": "<64 hex>",
                 "size": 6938078334}]}

Only ``format`` is required; every other key may be absent (then it is reported as unknown). The image's file
has no ``built_at``, ``worker.revision`` or ``worker.source``: those change with every build, so the build sets
them last, as ENV and labels (metadata, no layer), and the worker stamps them on (:func:`stamped`).

Standard library only: ``make build`` runs this module with a bare ``python3``:
``python3 -m supervisor.build_record labels FILE`` prints the labels as one JSON object, ``build-args FILE`` the
Dockerfile's label build args (``NAME=VALUE``, one a line); both take ``--revision``, ``--source``, ``--created``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

FORMAT = 1
LABEL_PREFIX = "comfyui-worker."
OCI = "org.opencontainers.image."
# The label -> the docker/Dockerfile build arg it is set from, in its last lines. The BUILD_* ones are the
# image's ENV too (the worker reads them, config.py), so /info and the labels say the same.
LABEL_ARGS = {
    OCI + "version": "LABEL_VERSION",
    OCI + "revision": "BUILD_REVISION",
    OCI + "source": "BUILD_SOURCE",
    OCI + "created": "BUILD_CREATED",
    LABEL_PREFIX + "comfyui.version": "LABEL_COMFYUI_VERSION",
    LABEL_PREFIX + "comfyui.ref": "LABEL_COMFYUI_REF",
    LABEL_PREFIX + "comfyui.commit": "LABEL_COMFYUI_COMMIT",
    LABEL_PREFIX + "custom-nodes": "LABEL_CUSTOM_NODES",
    LABEL_PREFIX + "models": "LABEL_MODELS",
}


class BuildRecordError(ValueError):
    """The record exists but cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class BuildRecord:
    """The parsed record. Strings are ``""`` when the build did not know them."""

    built_at: str = ""
    worker: dict[str, str] = field(default_factory=dict)
    comfyui: dict[str, str] = field(default_factory=dict)
    custom_nodes: tuple[dict[str, str], ...] = ()
    models: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "built_at": self.built_at, "worker": dict(self.worker),
                "comfyui": dict(self.comfyui), "custom_nodes": [dict(n) for n in self.custom_nodes],
                "models": [dict(m) for m in self.models]}


def load(path: Path) -> BuildRecord | None:
    """The record at ``path``; None when there is none (a checkout, not an image). BuildRecordError if unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BuildRecordError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return parse(json.loads(text))
    except ValueError as exc:
        raise BuildRecordError(f"{path}: {exc}") from None


def parse(body: Any) -> BuildRecord:
    """Check the shape of a record; ValueError naming the first wrong key."""
    if not isinstance(body, dict):
        raise ValueError("the build record is not a JSON object")
    if body.get("format") != FORMAT:
        raise ValueError(f"'format' is {body.get('format')!r}; this worker reads format {FORMAT}")
    return BuildRecord(
        built_at=_text(body, "built_at"),
        worker=_strings(body, "worker", ("version", "revision", "source")),
        comfyui=_strings(body, "comfyui", ("version", "ref", "commit", "repo")),
        custom_nodes=tuple(_strings({"n": n}, "n", ("name", "url", "commit"), where=f"custom_nodes[{i}]")
                           for i, n in enumerate(_list(body, "custom_nodes"))),
        models=tuple(_model(m, i) for i, m in enumerate(_list(body, "models"))),
    )


def labels(record: BuildRecord) -> dict[str, str]:
    """The image's labels for this record: ``org.opencontainers.image.*`` plus the worker's own.

    Keys whose value the build did not know are left out. Lists are compact JSON, so a model path with any
    character stays unambiguous.
    """
    out = {
        OCI + "version": record.worker.get("version", ""),
        OCI + "revision": record.worker.get("revision", ""),
        OCI + "source": record.worker.get("source", ""),
        OCI + "created": record.built_at,
        LABEL_PREFIX + "comfyui.version": record.comfyui.get("version", ""),
        LABEL_PREFIX + "comfyui.ref": record.comfyui.get("ref", ""),
        LABEL_PREFIX + "comfyui.commit": record.comfyui.get("commit", ""),
        LABEL_PREFIX + "custom-nodes": _compact([{"name": n.get("name", ""), "commit": n.get("commit", "")}
                                                 for n in record.custom_nodes]),
        LABEL_PREFIX + "models": _compact([{"path": m.get("path", ""), "sha256": m.get("sha256", "")}
                                           for m in record.models]),
    }
    return {k: v for k, v in out.items() if v}


def stamped(record: BuildRecord, revision: str = "", source: str = "", created: str = "") -> BuildRecord:
    """The record with what the build set at its end (BUILD_REVISION, BUILD_SOURCE, BUILD_CREATED): a given
    value wins over the file's."""
    worker = dict(record.worker)
    worker.update({k: v for k, v in (("revision", revision), ("source", source)) if v})
    return replace(record, worker=worker, built_at=created or record.built_at)


def build_args(record: BuildRecord) -> dict[str, str]:
    """The Dockerfile's label build args for this record (an unknown value is passed empty)."""
    found = labels(record)
    return {arg: found.get(key, "") for key, arg in LABEL_ARGS.items()}


def _compact(items: list[dict[str, str]]) -> str:
    return json.dumps(items, separators=(",", ":")) if items else ""


def _text(body: dict[str, Any], key: str, where: str = "") -> str:
    value = body.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"'{where}{key}' must be a string, not {type(value).__name__}")
    return value


def _strings(body: dict[str, Any], key: str, keys: tuple[str, ...], where: str | None = None) -> dict[str, str]:
    part = body.get(key)
    part = {} if part is None else part
    name = where if where is not None else key
    if not isinstance(part, dict):
        raise ValueError(f"'{name}' must be an object")
    return {k: _text(part, k, f"{name}.") for k in keys if part.get(k)}


def _list(body: dict[str, Any], key: str) -> list[Any]:
    value = body.get(key)
    value = [] if value is None else value
    if not isinstance(value, list):
        raise ValueError(f"'{key}' must be a list")
    return value


def _model(item: Any, index: int) -> dict[str, Any]:
    where = f"models[{index}]"
    entry: dict[str, Any] = _strings({"m": item}, "m", ("name", "path", "sha256"), where=where)
    size = item.get("size") if isinstance(item, dict) else None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"'{where}.size' must be a number of bytes")
        entry["size"] = size
    return entry


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m supervisor.build_record",
                                description="the labels a build record implies (docs/operations.md)")
    p.add_argument("command", choices=("labels", "build-args"),
                   help="labels: one JSON object; build-args: the Dockerfile's NAME=VALUE, one a line")
    p.add_argument("record", type=Path)
    for name in ("revision", "source", "created"):
        p.add_argument(f"--{name}", default="", help=f"BUILD_{name.upper()}: wins over the record's")
    args = p.parse_args(argv)
    try:
        record = load(args.record)
    except BuildRecordError as exc:
        print(f"build_record: {exc}", file=sys.stderr)
        return 1
    if record is None:
        print(f"build_record: no such file: {args.record}", file=sys.stderr)
        return 1
    record = stamped(record, args.revision, args.source, args.created)
    if args.command == "labels":
        print(json.dumps(labels(record), indent=1, sort_keys=True))
    else:
        print("\n".join(f"{name}={value}" for name, value in build_args(record).items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
