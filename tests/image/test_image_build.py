"""The image, built and run for real: a test variant of docker/Dockerfile through `make build`.

One build per session (see conftest.py). The checks, in the order they run:

* the build used the BuildKit secret: the hub server refuses the private model without the token (401), the
  build downloaded it with the token, and the model landed, byte for byte, where ComfyUI reads it;
* that token is in no layer of `docker save`, in no `docker history` entry, in no image metadata, in no build log;
* the node pack from the local git repository is installed at its pinned commit and registers its class;
* the worker does not run as root; the image's HEALTHCHECK says healthy when the worker is ready;
* a real /runsync against the running container returns an image (once the self-hosted API exists);
* with a stand-in that fails at every start, the HEALTHCHECK goes unhealthy, the worker ends `failed` (exit 1),
  and the image's healthcheck command reads that state as unhealthy;
* a code-only change rebuilds only the last layer, without one request to the hub server.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.image.imagekit import (
    IMAGE,
    PACK_CLASS,
    PACK_NAME,
    STANDIN_RELEASE_TAG,
    GitDaemon,
    GitPackServer,
    Hub,
    ImageUnderTest,
    Worker,
    healthcheck_fast,
    dump,
    health,
    history_text,
    image_layers,
    images_in,
    make_build_args,
    post_json,
    run_build,
    scan_saved_image,
    shell,
    standin_release_repo,
    wait_for,
)

pytestmark = pytest.mark.timeout(1800)  # the session's build happens in the first test's set-up

READY_TIMEOUT_S = 120


# ------------------------------------------------------------------------------------------------ the build


def test_build_used_the_token_secret_and_baked_the_models(engine: Any, image: ImageUnderTest, hub: Hub) -> None:
    # The build fetched the private model, authenticated (the log records "ok" for the right token)...
    build_log = hub.server.log()
    private = [e for e in build_log if e["path"] == hub.private_path]
    assert all(e["auth"] == "ok" for e in private), dump(private)
    assert any(e["method"] == "GET" and e["status"] in (200, 206) for e in private), \
        f"the build never downloaded {hub.private_path}; hub log:\n{dump(build_log)}"
    # ...which the hub server does not give without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(hub.server.url(hub.private_path), timeout=10)
    assert refused.value.code == 401
    # The models are in the image, where ComfyUI reads them (MODELS_DIR = <ComfyUI>/models), byte for byte.
    env = engine.images.get(image.ref).attrs["Config"]["Env"]
    assert "MODELS_DIR=/opt/ComfyUI/models" in env, env
    listing = shell(engine, image.ref, "cd /opt/ComfyUI/models && sha256sum " + " ".join(hub.files))
    found = {line.split()[1]: line.split()[0] for line in listing.splitlines() if line.strip()}
    assert found == {dest: sha for dest, (sha, _) in hub.files.items()}, listing


def test_token_is_in_no_layer_no_history_and_no_log(engine: Any, image: ImageUnderTest, hub: Hub,
                                                      tmp_path: Any) -> None:
    token = hub.token.encode()
    scanned, hits = scan_saved_image(engine, image.ref, token, tmp_path)
    layers = image_layers(engine, image.ref)
    layer_tars = [name for name in scanned if name.endswith("layer.tar")]
    # docker save stores one tar per distinct layer (identical empty layers are stored once)
    assert len(layer_tars) >= len(set(layers)) - 1 and len(layer_tars) >= 5, (layer_tars, layers)
    assert hits == [], f"the token is in {hits}"
    history = history_text(image.ref)
    assert len(history.splitlines()) >= len(layers), history[:2000]
    assert hub.token not in history
    assert hub.token not in dump(engine.images.get(image.ref).attrs)
    assert hub.token not in image.build.log


def test_node_pack_is_installed_at_its_pinned_commit(engine: Any, image: ImageUnderTest,
                                                      pack: GitPackServer) -> None:
    target = f"/opt/ComfyUI/custom_nodes/{PACK_NAME}"
    out = shell(engine, image.ref, f"test -f {target}/__init__.py && echo init-present; "
                                   f"test -e {target}/LATER.txt && echo later-present; "
                                   f"grep -c {PACK_CLASS} {target}/__init__.py")
    assert "init-present" in out, out
    assert "later-present" not in out, f"{target} is not at the pinned commit {pack.commit}: {out}"


def test_comfyui_from_git_is_the_pinned_ref(engine: Any, image: ImageUnderTest, hub: Hub, tmp_path: Any,
                                           report: Callable[[str], None]) -> None:
    """The users' path (COMFYUI_SOURCE=git): a shallow fetch of COMFYUI_REF from COMFYUI_REPO, here a git daemon
    on loopback serving the stand-in with a release tag and a later commit. Only that stage is built."""
    tagged = standin_release_repo(tmp_path / "work")
    daemon = GitDaemon(tmp_path / "git").add("ComfyUI", tmp_path / "work").start()
    try:
        tag = f"{image.ref.split(':')[1]}-git"
        cmd = make_build_args(image.context, tag, hub.server.endpoint, None,
                              extra_args=(f"--build-arg COMFYUI_REPO={daemon.url('ComfyUI')}",
                                          f"--build-arg COMFYUI_REF={STANDIN_RELEASE_TAG}"),
                              extra_flags=("--target comfyui-git",))
        build = run_build(cmd, tmp_path / "git-build.log", report, 600)
    finally:
        daemon.stop()
    assert build.ok, f"the comfyui-git stage did not build:\n{build.tail()}"
    try:
        out = shell(engine, f"{IMAGE}:{tag}", "cat /opt/ComfyUI/.comfyui-commit; ls -a /opt/ComfyUI")
    finally:
        engine.images.remove(f"{IMAGE}:{tag}")
    commit, *listing = out.split()
    assert commit == tagged
    assert "main.py" in listing and "AFTER_THE_TAG.txt" not in listing and ".git" not in listing, listing


def test_a_node_pack_that_does_not_import_fails_the_build(image: ImageUnderTest, hub: Hub, tmp_path: Any,
                                                          report: Callable[[str], None]) -> None:
    """ComfyUI would skip a broken pack silently at run time; the build must stop instead."""
    broken = GitPackServer(tmp_path / "broken", name="ComfyUI-BrokenPack",
                           init_py='raise ImportError("broken on purpose by the image test")\n').start()
    context = image.context.parent / "context-broken"
    shutil.copytree(image.context, context)
    (context / "custom_nodes.txt").write_text(f"{broken.url}@{broken.commit}\n")
    try:
        tag = f"{image.ref.split(':')[1]}-broken"
        cmd = make_build_args(context, tag, hub.server.endpoint, image.token_file)
        build = run_build(cmd, tmp_path / "broken-build.log", report, 600)
    finally:
        broken.stop()
        shutil.rmtree(context, ignore_errors=True)
    assert not build.ok, "the build succeeded with a node pack that cannot be imported"
    assert "ComfyUI-BrokenPack" in build.log and "install_nodes.py" in build.log, build.tail()


# ------------------------------------------------------------------------------------------------ running


def test_worker_runs_as_a_non_root_user(worker: Worker) -> None:
    code, out = worker.container.exec_run(["id", "-u"])
    assert code == 0, out
    assert out.decode().strip() != "0"
    top = worker.container.top(ps_args="-o uid,pid,args")
    uids = {row[0] for row in top["Processes"]}
    assert "0" not in uids, f"a process runs as root: {top}"


def test_healthcheck_is_healthy_when_the_worker_is_ready(worker: Worker) -> None:
    container = worker.container

    def healthy() -> bool:
        h = health(container)
        if container.status == "exited":
            raise AssertionError(f"the worker exited:\n{container.logs(tail=60).decode(errors='replace')}")
        return h.get("Status") == "healthy"

    try:
        wait_for(healthy, READY_TIMEOUT_S, "the container's health to become healthy")
    except AssertionError:
        raise AssertionError(f"not healthy: {dump(health(container))}\n"
                             f"{container.logs(tail=60).decode(errors='replace')}") from None
    code, out = container.exec_run(["cat", "/tmp/comfyui-worker/state.json"])
    state = json.loads(out)
    # REQUIRED_NODES names the git pack's class: "ready" (not "degraded") proves ComfyUI registered it.
    assert state["state"] == "ready", state
    assert "healthy: supervisor state is 'ready'" in health(container)["Log"][-1]["Output"]


def test_healthcheck_works_in_runpod_mode_without_an_http_api(engine: Any, image: ImageUnderTest) -> None:
    # RunPod's job queue is unreachable here: the SDK's loop keeps asking, the supervisor is ready all the same.
    container = engine.containers.run(
        image.ref, detach=True, name=f"imagetest-runpod-{uuid.uuid4().hex[:8]}",
        environment={"RUNPOD_WEBHOOK_GET_JOB": "http://127.0.0.1:9/job-take/$RUNPOD_POD_ID",
                     "RUNPOD_POD_ID": "imagetest", "RUNPOD_AI_API_KEY": secrets.token_urlsafe(16)},
        healthcheck=healthcheck_fast(image.ref, engine))
    try:
        wait_for(lambda: health(container).get("Status") == "healthy" or container.status == "exited",
                 READY_TIMEOUT_S, "the RunPod-mode worker's health")
        logs = container.logs(tail=40).decode(errors="replace")
        assert health(container)["Status"] == "healthy", f"{dump(health(container))}\n{logs}"
        # nothing listens on the API port in this mode (ComfyUI's 8188 on loopback only)
        code, out = container.exec_run(["cat", "/proc/net/tcp", "/proc/net/tcp6"])
        listening = {int(line.split()[1].rsplit(":", 1)[1], 16) for line in out.decode().splitlines()[1:]
                     if len(line.split()) > 3 and line.split()[3] == "0A"}
        assert 8000 not in listening and 8188 in listening, listening
    finally:
        container.remove(force=True)


def txt2img_workflow() -> dict[str, Any]:
    """A small txt2img graph on the baked checkpoint, through the git pack's node, to SaveImage."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "image-test.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "10": {"class_type": PACK_CLASS, "inputs": {"images": ["8", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "imagetest", "images": ["10", 0]}},
    }


def test_runsync_against_the_running_container_returns_an_image(worker: Worker, image: ImageUnderTest) -> None:
    wait_for(lambda: health(worker.container).get("Status") == "healthy", READY_TIMEOUT_S, "a healthy worker")
    body = {"input": {"workflow": txt2img_workflow()}}
    status, _ = post_json(f"{worker.api_url}/runsync", body, None, timeout=30)
    assert status == 401, f"/runsync without the API key answered {status}"
    status, response = post_json(f"{worker.api_url}/runsync", body, worker.api_key, timeout=120)
    logs = worker.container.logs(tail=40).decode(errors="replace")
    assert status == 200, f"/runsync answered {status}: {str(response)[:2000]}\n{logs}"
    assert isinstance(response, dict) and str(response.get("status", "")).upper() == "COMPLETED", \
        f"{str(response)[:2000]}\n{logs}"
    images = images_in(response.get("output"))
    assert images, f"no image in the /runsync output: {str(response)[:2000]}"


# ------------------------------------------------------------------------------------------------ failure


def test_healthcheck_goes_unhealthy_when_the_supervisor_fails(engine: Any, image: ImageUnderTest) -> None:
    volume = engine.volumes.create(f"imagetest-data-{uuid.uuid4().hex[:8]}")
    container = None
    try:
        container = engine.containers.run(
            image.ref, detach=True, name=f"imagetest-failing-{uuid.uuid4().hex[:8]}",
            environment={"WORKER_MODE": "http", "API_KEY": secrets.token_urlsafe(16),
                         "STANDIN_START_FAULT": "exit:3", "CRASH_LOOP_MAX": "3", "RESTART_BACKOFF_S": "2",
                         "STATE_FILE": "/data/state.json"},
            volumes={volume.name: {"bind": "/data", "mode": "rw"}},
            healthcheck=healthcheck_fast(image.ref, engine))
        seen: list[str] = []

        def ended() -> bool:
            h = health(container)
            seen.append(h.get("Status", "?"))
            return container.status == "exited"

        wait_for(ended, 120, "the crash-looping worker to give up", interval=0.2)
        logs = container.logs().decode(errors="replace")
        exit_code = container.attrs["State"]["ExitCode"]
        h = health(container)
        assert exit_code == 1, f"exit code {exit_code}\n{logs[-3000:]}"
        assert "-> failed" in logs, logs[-3000:]
        # Docker's own verdict while it crash-looped: unhealthy, from the image's command (never healthy).
        assert "unhealthy" in seen and "healthy" not in seen, seen
        assert h["Status"] == "unhealthy", dump(h)
        assert any(entry["ExitCode"] == 1 and entry["Output"].startswith("unhealthy: supervisor state is")
                   for entry in h["Log"]), dump(h)
        # The state it ended in, read by the image's healthcheck command (same image, the same state file).
        test = engine.images.get(image.ref).attrs["Config"]["Healthcheck"]["Test"]
        assert test[0] == "CMD", test
        checker = engine.containers.run(image.ref, entrypoint=test[1:], detach=True,
                                        environment={"STATE_FILE": "/data/state.json"},
                                        volumes={volume.name: {"bind": "/data", "mode": "ro"}})
        try:
            result = checker.wait(timeout=60)
            output = checker.logs().decode(errors="replace")
        finally:
            checker.remove(force=True)
        assert result["StatusCode"] == 1, output
        assert output.startswith("unhealthy: supervisor state is 'failed'"), output
    finally:
        if container is not None:
            container.remove(force=True)
        volume.remove(force=True)


# ------------------------------------------------------------------------------------------------ rebuild


def test_a_code_only_change_rebuilds_only_the_last_layer(engine: Any, image: ImageUnderTest, hub: Hub,
                                                         report: Callable[[str], None]) -> None:
    hub.server.reset()  # forget the first build's requests
    marker = image.context / "supervisor" / "__init__.py"
    marker.write_text(marker.read_text() + f"\n# image test: a code-only change {time.time()}\n")
    cmd = [a if not a.startswith("TAG=") else f"{a}-rebuild" for a in image.make_cmd]
    rebuild = run_build(cmd, image.workdir / "rebuild.log", report, 900)
    assert rebuild.ok, f"the rebuild failed ({rebuild.returncode}):\n{rebuild.tail()}"
    report(f"code-only rebuild took {rebuild.seconds:.1f} s")
    before = image_layers(engine, image.ref)
    after = image_layers(engine, f"{IMAGE}:{rebuild.tag}")
    assert len(before) == len(after), (before, after)
    assert before[:-1] == after[:-1], "a layer other than the last was rebuilt"
    assert before[-1] != after[-1], "the code layer did not change"
    requests = [e for e in hub.server.log() if not e["path"].startswith("/_control")]
    assert requests == [], f"the rebuild talked to the hub server: {dump(requests)}"
    assert hub.token not in rebuild.log
