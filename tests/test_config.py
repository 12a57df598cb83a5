"""Settings: read once from the environment, typed, with one clear error naming every bad variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import BOOL_ACCEPTED, ConfigError, Settings, load_settings, parse_bool


def test_defaults_without_any_variable() -> None:
    s = load_settings({})
    assert isinstance(s, Settings)
    assert s.comfyui_host == "127.0.0.1" and s.comfyui_port == 8188
    assert s.comfyui_dir == Path("/opt/ComfyUI") and s.models_dir == Path("/opt/ComfyUI/models")
    assert s.worker_mode == "http" and s.api_host == "127.0.0.1" and s.api_port == 8000
    assert s.start_timeout_s == 300 and s.job_timeout_s == 600 and s.max_concurrency == 1
    assert s.websocket_reconnect_attempts == 5 and s.websocket_reconnect_delay_s == 3
    assert s.max_output_bytes == 15 * 1024 * 1024 and s.runsync_wait_s == 90
    assert s.comfyui_url == "http://127.0.0.1:8188"


def test_settings_are_immutable() -> None:
    s = load_settings({})
    with pytest.raises(AttributeError):
        s.comfyui_port = 1  # type: ignore[misc]


@pytest.mark.parametrize("word,value", [("1", True), ("TRUE", True), ("Yes", True), ("0", False), ("false", False), ("NO", False)])
def test_one_boolean_spelling_set(word: str, value: bool) -> None:
    assert parse_bool(word) is value
    assert load_settings({"KEEP_OUTPUTS": word}).keep_outputs is value


def test_every_bad_variable_is_named_with_what_is_accepted() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"COMFYUI_PORT": "99999", "KEEP_OUTPUTS": "maybe", "WORKER_MODE": "lambda", "JOB_TIMEOUT_S": "soon"})
    text = str(info.value)
    assert text.startswith("invalid configuration (4 problem(s)):")
    assert "COMFYUI_PORT='99999' is not valid; accepted: an integer from 1 to 65535" in text
    assert f"KEEP_OUTPUTS='maybe' is not valid; accepted: {BOOL_ACCEPTED}" in text
    assert "WORKER_MODE='lambda' is not valid; accepted: one of http, runpod" in text
    assert "JOB_TIMEOUT_S='soon' is not valid; accepted: a number >= 0.1" in text


def test_secret_values_are_never_echoed() -> None:
    env = {"BUCKET_ACCESS_KEY_ID": "AKIASECRETVALUE123", "API_KEY": "sk-supersecret"}
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert "AKIASECRETVALUE123" not in str(info.value)
    assert "must be set together" in str(info.value)
    s = load_settings({"API_KEY": "sk-supersecret"})
    assert "sk-supersecret" not in repr(s)


def test_worker_secrets_are_not_passed_to_comfyui() -> None:
    s = load_settings({"API_KEY": "k", "PATH": "/bin", "BUCKET_SECRET_ACCESS_KEY": "s", "BUCKET_ACCESS_KEY_ID": "a",
                       "BUCKET_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert s.child_env == {"PATH": "/bin", "BUCKET_ENDPOINT_URL": "http://127.0.0.1:9"}


def test_runpod_mode_is_chosen_when_the_platform_sets_its_job_url() -> None:
    assert load_settings({"RUNPOD_WEBHOOK_GET_JOB": "http://x/job-take/$ID?gpu=1"}).worker_mode == "runpod"
    assert load_settings({"RUNPOD_WEBHOOK_GET_JOB": "http://x/?", "WORKER_MODE": "http"}).worker_mode == "http"


def test_lists_and_arguments() -> None:
    s = load_settings({"REQUIRED_NODES": "IPAdapter, CLIPVisionLoader,,", "COMFYUI_ARGS": "--cpu --preview-method 'none'",
                       "URL_INPUT_ALLOWLIST": "Images.Example.com, 10.1.0.0/16, 127.0.0.1"})
    assert s.required_nodes == ("IPAdapter", "CLIPVisionLoader")
    assert s.comfyui_args == ("--cpu", "--preview-method", "none")
    assert s.url_input_allowlist == ("images.example.com", "10.1.0.0/16", "127.0.0.1/32")
    with pytest.raises(ConfigError, match="URL_INPUT_ALLOWLIST"):
        load_settings({"URL_INPUT_ALLOWLIST": "http://x.com/path"})


def test_probe_metrics_and_envelope_settings() -> None:
    s = load_settings({})
    assert (s.metrics_enabled, s.metrics_public, s.metrics_port, s.runsync_envelope) == (True, False, None, "runpod")
    assert s.build_record_file == Path("/opt/worker/build-record.json")
    s = load_settings({"METRICS_ENABLED": "no", "METRICS_PUBLIC": "yes", "METRICS_PORT": "9100",
                       "RUNSYNC_ENVELOPE": "Output", "BUILD_RECORD_FILE": "/srv/record.json"})
    assert (s.metrics_enabled, s.metrics_public, s.metrics_port, s.runsync_envelope) == (False, True, 9100, "output")
    assert s.build_record_file == Path("/srv/record.json")
    with pytest.raises(ConfigError) as info:
        load_settings({"METRICS_PORT": "0", "RUNSYNC_ENVELOPE": "bare", "PORT": "x", "WORKER_MODE": "runpod-lb"})
    text = str(info.value)
    assert "METRICS_PORT='0' is not valid; accepted: an integer from 1 to 65535" in text
    assert "RUNSYNC_ENVELOPE='bare' is not valid; accepted: one of runpod, output" in text
    assert "PORT='x' is not valid; accepted: an integer from 1 to 65535" in text


def test_front_door_limits_have_defaults_and_refuse_nonsense() -> None:
    s = load_settings({})
    assert (s.header_timeout_s, s.body_timeout_s, s.max_connections, s.max_input_pixels) == (10.0, 120.0, 512,
                                                                                            64_000_000)
    s = load_settings({"HEADER_TIMEOUT_S": "2.5", "BODY_TIMEOUT_S": "30", "MAX_CONNECTIONS": "64",
                       "MAX_INPUT_PIXELS": "1000000"})
    assert (s.header_timeout_s, s.body_timeout_s, s.max_connections, s.max_input_pixels) == (2.5, 30.0, 64, 1_000_000)
    with pytest.raises(ConfigError) as info:
        load_settings({"HEADER_TIMEOUT_S": "0", "BODY_TIMEOUT_S": "-1", "MAX_CONNECTIONS": "0", "MAX_INPUT_PIXELS": "x"})
    assert [p.split("=")[0] for p in info.value.problems] == ["MAX_INPUT_PIXELS", "HEADER_TIMEOUT_S", "BODY_TIMEOUT_S",
                                                             "MAX_CONNECTIONS"]


# --- COMFYUI_INSTANCES ------------------------------------------------------------------------------------


def test_one_instance_by_default_leaves_comfyui_as_it_was() -> None:
    s = load_settings({"DATA_DIR": "/d", "CUDA_VISIBLE_DEVICES": "3"})
    assert s.instance_gpus == (None,) and s.instances == 1 and s.max_concurrency == 1
    assert s.for_instance(0) is s  # same port, same folders, the worker's own CUDA_VISIBLE_DEVICES


@pytest.mark.parametrize("value,visible,gpus", [
    ("2", None, ("0", "1")),
    ("3", "4,5", ("4", "5", "4")),  # the visible GPUs, in turn
    ("0,0", None, ("0", "0")),  # two instances sharing GPU 0
    ("1,3", None, ("1", "3")),
    ("3,", None, ("3",)),  # a list of one GPU id (a bare 3 is three instances)
    ("GPU-8f3a2b1c-aaaa,MIG-1/2/3", None, ("GPU-8f3a2b1c-aaaa", "MIG-1/2/3")),
    ("auto", "2,3", ("2", "3")),
])
def test_instances_one_per_gpu(value: str, visible: str | None, gpus: tuple[str, ...]) -> None:
    env = {"COMFYUI_INSTANCES": value, "COMFYUI_PORT": "9000", "DATA_DIR": "/d", "PATH": "/nonexistent"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    s = load_settings(env)
    assert s.instance_gpus == gpus and s.max_concurrency == len(gpus) and s.jobs_per_instance == 1
    last = s.for_instance(len(gpus) - 1)
    if len(gpus) > 1:
        assert last.comfyui_port == 9000 + len(gpus) - 1 and last.comfyui_url.endswith(f":{last.comfyui_port}")
        assert last.data_dir == Path(f"/d/instance-{len(gpus) - 1}") and last.state_file is None
        assert last.child_env["CUDA_VISIBLE_DEVICES"] == gpus[-1]


def test_max_concurrency_is_shared_out_over_the_instances() -> None:
    s = load_settings({"COMFYUI_INSTANCES": "2", "MAX_CONCURRENCY": "3"})
    assert s.max_concurrency == 3 and s.jobs_per_instance == 2


def test_auto_asks_nvidia_smi_and_falls_back_to_one_instance(tmp_path: Path) -> None:
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A100 (UUID: GPU-0)'\necho 'GPU 1: NVIDIA A100 (UUID: GPU-1)'\n")
    tool.chmod(0o755)
    s = load_settings({"COMFYUI_INSTANCES": "auto", "PATH": str(tmp_path)})
    assert s.instance_gpus == ("0", "1") and "2 GPU(s) from nvidia-smi -L" in s.instances_note
    none = load_settings({"COMFYUI_INSTANCES": "auto", "PATH": str(tmp_path / "empty")})
    assert none.instance_gpus == (None,) and "no nvidia-smi on PATH" in none.instances_note
    hidden = load_settings({"COMFYUI_INSTANCES": "auto", "PATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""})
    assert hidden.instance_gpus == (None,) and "no GPU visible" in hidden.instances_note
    tool.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    broken = load_settings({"COMFYUI_INSTANCES": "auto", "PATH": str(tmp_path)})
    assert broken.instance_gpus == (None,) and "exited with 9: NVIDIA-SMI has failed" in broken.instances_note


@pytest.mark.parametrize("value", ["0", "65", "two", "0;1", "a,b", "-1"])
def test_bad_instances_say_what_is_accepted(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"COMFYUI_INSTANCES": value})
    assert f"COMFYUI_INSTANCES={value!r} is not valid; accepted: 1 (the default), a number of instances" in str(info.value)


def test_the_api_port_must_not_be_one_of_comfyuis() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"COMFYUI_INSTANCES": "3", "COMFYUI_PORT": "8188", "API_PORT": "8190"})
    assert "API_PORT=8190 and ComfyUI's ports 8188-8190 (COMFYUI_PORT=8188, 3 instances) overlap" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings({"WORKER_MODE": "runpod", "COMFYUI_INSTANCES": "2", "COMFYUI_PORT": "9000", "METRICS_PORT": "9001"})
    assert "METRICS_PORT=9001 and ComfyUI's ports 9000-9001 (COMFYUI_PORT=9000, 2 instances) overlap" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings({"COMFYUI_INSTANCES": "4", "COMFYUI_PORT": "65534"})
    assert "COMFYUI_PORT=65534 with 4 instances needs ports up to 65537" in str(info.value)


def test_launch_mode_defaults_to_fork_on_linux_and_refuses_anything_else() -> None:
    import sys

    default = load_settings({})
    assert default.comfyui_launch == ("fork" if sys.platform.startswith("linux") else "exec")
    assert default.launch_gc_freeze is True
    assert load_settings({"COMFYUI_LAUNCH": "EXEC", "COMFYUI_LAUNCH_GC_FREEZE": "false"}).comfyui_launch == "exec"
    with pytest.raises(ConfigError) as err:
        load_settings({"COMFYUI_LAUNCH": "spawn"})
    assert "COMFYUI_LAUNCH" in str(err.value) and "fork, exec" in str(err.value)
