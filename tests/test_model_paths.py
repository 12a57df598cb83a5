"""The generated extra_model_paths.yaml lists every root for every folder key (ipadapter included)."""

from __future__ import annotations

from pathlib import Path

import yaml

from supervisor.supervision.model_paths import FOLDER_DIRS, write_extra_model_paths


def test_every_root_lists_every_key(tmp_path: Path) -> None:
    models, volume = tmp_path / "models", tmp_path / "volume"
    volume.mkdir()
    doc = yaml.safe_load(write_extra_model_paths(tmp_path / "x.yaml", models, volume).read_text())
    assert list(doc) == ["worker_models", "network_volume"]
    assert doc["worker_models"]["base_path"] == str(models) and doc["worker_models"]["is_default"] is True
    assert doc["network_volume"]["base_path"] == str(volume) and "is_default" not in doc["network_volume"]
    for section in doc.values():
        for key in ("ipadapter", "clip_vision", "checkpoints", "loras", "text_encoders", "diffusion_models"):
            assert key in section
        assert section["text_encoders"].split() == ["text_encoders", "clip"]
        assert set(FOLDER_DIRS) <= set(section)


def test_volume_root_only_when_mounted(tmp_path: Path) -> None:
    doc = yaml.safe_load(write_extra_model_paths(tmp_path / "x.yaml", tmp_path / "m", tmp_path / "absent").read_text())
    assert list(doc) == ["worker_models"]
