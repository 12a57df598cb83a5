"""`fetch_models.py lock`: fills missing sha256 and sizes and pins hf revisions, from the loopback Hub and Civitai,
editing the manifest in place without losing its comments."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.hubserver.harness import HubServer, payload, run_script, script_env

pytestmark = pytest.mark.timeout(120)

CIVITAI = "civ_tok_1a2b3c4d5e6f7a8b"

MANIFEST = """\
# my image
version: 1
models:
  - name: base            # the checkpoint
    folder: checkpoints
    filename: base.safetensors
    hf:
      repo: acme/models
      file: base.safetensors
      revision: main
  - {name: lora, folder: loras, filename: l.safetensors, hf: {repo: acme/models, file: sub/l.safetensors}}
  - name: civ
    folder: checkpoints
    filename: civ.safetensors
    civitai: {version_id: 31337}
    secret: CIVITAI_TOKEN
    optional: true
"""


@pytest.fixture
def hub(tmp_path: Path):
    with HubServer(tmp_path / "root", cdn=True, civitai_private=True, civitai_token=CIVITAI) as server:
        yield server


def lock(tmp_path: Path, hub: HubServer, manifest: Path, *args: str, **env: str):
    return run_script("fetch_models.py", ["lock", "--manifest", str(manifest), *args],
                      {**script_env(tmp_path, hub), **env})


def test_lock_pins_revisions_and_fills_hashes_and_sizes_keeping_comments(tmp_path: Path, hub: HubServer) -> None:
    base, lora, civ = payload(5000, 1), payload(7000, 2), payload(9000, 3)
    base_sha = hub.add_hf("acme/models", "base.safetensors", base)
    lora_sha = hub.add_hf("acme/models", "sub/l.safetensors", lora)
    civ_sha = hub.add_civitai(31337, "civ.safetensors", civ)
    commit = hub.commit_of("acme/models")
    manifest = tmp_path / "models.yaml"
    manifest.write_text(MANIFEST)

    result = lock(tmp_path, hub, manifest, CIVITAI_TOKEN=CIVITAI)

    assert result.returncode == 0, result.stderr
    text = manifest.read_text()
    assert "# my image" in text and "# the checkpoint" in text
    assert f"revision: {commit}  # was main" in text
    assert f"sha256: {base_sha}" in text and "size: 5000" in text
    assert f"hf: {{repo: acme/models, file: sub/l.safetensors, revision: {commit}}}" in text
    assert f"sha256: {lora_sha}" in text and f"sha256: {civ_sha}" in text
    assert CIVITAI not in result.stdout + result.stderr

    again = lock(tmp_path, hub, manifest, CIVITAI_TOKEN=CIVITAI)
    assert again.returncode == 0 and "already locked" in again.stderr
    assert manifest.read_text() == text

    models = tmp_path / "models"
    fetched = run_script("fetch_models.py", ["--manifest", str(manifest), "--models-dir", str(models)],
                         {**script_env(tmp_path, hub), "CIVITAI_TOKEN": CIVITAI})
    assert fetched.returncode == 0, fetched.stderr
    assert (models / "checkpoints" / "civ.safetensors").read_bytes() == civ
    assert (models / "loras" / "l.safetensors").read_bytes() == lora


def test_lock_dry_run_writes_nothing_and_needs_no_civitai_token(tmp_path: Path, hub: HubServer) -> None:
    hub.add_hf("acme/models", "base.safetensors", payload(5000, 1))
    hub.add_hf("acme/models", "sub/l.safetensors", payload(7000, 2))
    civ_sha = hub.add_civitai(31337, "civ.safetensors", payload(9000, 3))
    manifest = tmp_path / "models.yaml"
    text = MANIFEST + """\
  - name: private
    folder: loras
    filename: p.safetensors
    hf: {repo: acme/private, file: p.safetensors}
    secret: HF_TOKEN
    optional: true
"""
    manifest.write_text(text)

    result = lock(tmp_path, hub, manifest, "--dry-run")

    assert result.returncode == 0, result.stderr
    assert "lock entry 1 (base): hf.revision: " in result.stderr
    assert f"lock entry 3 (civ): sha256: {civ_sha}" in result.stderr  # Civitai publishes hashes without a token
    assert "notice: lock skips optional entry 4 (private): needs secret HF_TOKEN" in result.stderr
    assert manifest.read_text() == text


def test_lock_refuses_to_overwrite_a_hash_the_hub_contradicts(tmp_path: Path, hub: HubServer) -> None:
    hub.add_hf("acme/models", "base.safetensors", payload(5000, 1))
    pinned = hashlib.sha256(b"old").hexdigest()
    manifest = tmp_path / "models.yaml"
    text = ("version: 1\nmodels:\n  - name: base\n    folder: checkpoints\n    filename: b.safetensors\n"
            f"    sha256: {pinned}\n    hf: {{repo: acme/models, file: base.safetensors}}\n")
    manifest.write_text(text)

    result = lock(tmp_path, hub, manifest)

    assert result.returncode == 1
    assert f"entry 1 (base): the manifest pins sha256 {pinned} but the hub has" in result.stderr
    assert manifest.read_text() == text
