"""scripts/model_layers.py: the Dockerfile `make build` builds, with one stage and one layer per model file.

Run as users' `make build` runs it (a subprocess on the real docker/Dockerfile and a models.yaml); what the layers
do on the wire is measured by tests/image/test_registry_layers.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHA = "0" * 64


def manifest(sizes: dict[str, int | None]) -> str:
    out = "version: 1\nmodels:" + ("\n" if sizes else " []\n")
    for name, size in sizes.items():
        out += (f"  - name: {name}\n    folder: loras\n    filename: {name}.safetensors\n"
                f"    url: https://example.com/{name}.safetensors\n    sha256: \"{SHA}\"\n")
        if size is not None:
            out += f"    size: {size}\n"
    return out


def generate(tmp_path: Path, sizes: dict[str, int | None], *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    (tmp_path / "models.yaml").write_text(manifest(sizes))
    out = tmp_path / "build" / "model-layers"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "model_layers.py"), "--manifest",
                           str(tmp_path / "models.yaml"), "--dockerfile", str(ROOT / "docker" / "Dockerfile"),
                           "--context", str(tmp_path), "--out", str(out), *extra],
                          text=True, capture_output=True, timeout=60)
    return proc, out


def layer_lines(dockerfile: str) -> list[str]:
    block = dockerfile.split("# @model-layers-begin\n", 1)[1].split("# @model-layers-end\n", 1)[0]
    return block.splitlines()


def test_one_stage_and_one_layer_per_model_in_manifest_order(tmp_path: Path) -> None:
    proc, out = generate(tmp_path, {"Alpha One": 10, "beta": None, "gamma": 5})
    assert proc.returncode == 0, proc.stderr
    text = (out / "Dockerfile").read_text()
    assert layer_lines(text) == [f"COPY --from={s} /out/models/ /opt/ComfyUI/models/"
                                 for s in ("model-alpha-one", "model-beta", "model-gamma")]
    # each stage reads only its own entry
    fragment = json.loads((out / "model-beta.json").read_text())
    assert [m["name"] for m in fragment["models"]] == ["beta"] and fragment["version"] == 1
    assert "COPY build/model-layers/model-beta.json /opt/build/models.json" in text
    # the models sit right above the system layer: the first instructions of the image stage
    image = text.split("FROM system AS image\n", 1)[1]
    first = [ln for ln in image.splitlines() if re.match(r"^(RUN|COPY|ADD)\b", ln)]
    assert first[:3] == layer_lines(text), first[:4]
    # the record lists the models in the manifest's order
    assert ("merge_model_records.py /out/records /opt/build/models-record.json model-alpha-one model-beta "
            "model-gamma") in text
    # nothing of the standalone block is left
    assert "FROM fetch-tools AS models\n" not in text and "ARG MODELS_MANIFEST" not in text


def test_one_entry_does_not_change_another_entrys_stage(tmp_path: Path) -> None:
    _, out = generate(tmp_path, {"a": 1, "b": 2})
    before = (out / "model-a.json").read_text()
    (tmp_path / "models.yaml").write_text(manifest({"a": 1, "b": 3, "c": 4}))
    proc, out = generate(tmp_path, {"a": 1, "b": 3, "c": 4})
    assert proc.returncode == 0, proc.stderr
    assert (out / "model-a.json").read_text() == before


def test_small_files_share_a_layer_up_to_group_mb(tmp_path: Path) -> None:
    mib = 1 << 20
    proc, out = generate(tmp_path, {"a": mib, "b": mib, "c": 3 * mib, "d": None, "e": mib}, "--group-mb", "2")
    assert proc.returncode == 0, proc.stderr
    lines = layer_lines((out / "Dockerfile").read_text())
    assert [ln.split()[1] for ln in lines] == ["--from=model-a-and-1-more", "--from=model-c", "--from=model-d",
                                                "--from=model-e"], lines
    assert [m["name"] for m in json.loads((out / "model-a-and-1-more.json").read_text())["models"]] == ["a", "b"]


def test_an_empty_manifest_gives_no_model_layer_and_an_empty_record(tmp_path: Path) -> None:
    proc, out = generate(tmp_path, {})
    assert proc.returncode == 0, proc.stderr
    text = (out / "Dockerfile").read_text()
    assert layer_lines(text) == []
    assert "FROM system AS models-record" in text


def test_an_invalid_manifest_or_group_size_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text("version: 1\nmodels:\n  - name: x\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "model_layers.py"), "--manifest",
                           str(tmp_path / "models.yaml"), "--dockerfile", str(ROOT / "docker" / "Dockerfile"),
                           "--context", str(tmp_path), "--out", str(tmp_path / "build" / "m")],
                          text=True, capture_output=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("model_layers: error: invalid"), proc.stderr
    proc, _ = generate(tmp_path, {"a": 1}, "--group-mb", "-1")
    assert proc.returncode == 2 and "--group-mb (MODEL_GROUP_MB) is -1" in proc.stderr, proc.stderr


def test_docker_dockerfile_alone_still_builds_every_model_in_one_layer() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert layer_lines(text) == ["COPY --from=models /out/models/ /opt/ComfyUI/models/"]
