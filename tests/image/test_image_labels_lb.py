"""The test image's labels and build record, seen from outside and from inside, in RunPod load-balancing mode.

`make build` writes the build record from what the build baked (the models the fetcher verified, the node pack
at the commit the installer checked out) and sets the labels last from it; `docker inspect` must show them
without running anything, and the running worker's `/info` must say the same. The container runs as RunPod's
load balancer runs it: `WORKER_MODE=runpod-lb` with `PORT` and `PORT_HEALTH` set, probed on `/ping` (204 while
initializing, then 200), and serving `/runsync` on `PORT`.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from supervisor import __version__
from supervisor.build_record import LABEL_ARGS
from tests.helpers.api import Api, pings
from tests.image.imagekit import PACK_NAME, ROOT, GitPackServer, Hub, ImageUnderTest, dump

pytestmark = pytest.mark.timeout(1500)

PORT, PORT_HEALTH = 8080, 8081  # inside the container; published on free loopback ports
OURS = ("org.opencontainers.image.", "comfyui-worker.")
GRAPH = {"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 255}},
         "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "lb"}}}


def our_labels(engine: Any, ref: str) -> dict[str, str]:
    """The image's labels of the OCI and worker namespaces (a base image may bring labels of its own), without
    the empty ones: the Dockerfile sets every label, empty when its value is unknown (labels() leaves it out)."""
    found = engine.images.get(ref).labels or {}
    return {k: v for k, v in found.items() if k.startswith(OURS) and v}


@pytest.fixture(scope="module")
def lb_worker(engine: Any, image: ImageUnderTest, report: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """The image started as RunPod's load balancer starts it; yields its two ports, its key and its first pings."""
    api_key = secrets.token_urlsafe(24)
    container = engine.containers.run(
        image.ref, detach=True, name=f"imagetest-lb-{uuid.uuid4().hex[:8]}",
        environment={"WORKER_MODE": "runpod-lb", "PORT": str(PORT), "PORT_HEALTH": str(PORT_HEALTH),
                     "API_KEY": api_key, "COMFYUI_ARGS": "--cpu",
                     # the stand-in takes a while to start, as a real ComfyUI does: /ping's 204 is seen
                     "STANDIN_START_DELAY_S": "3"},
        ports={f"{PORT}/tcp": ("127.0.0.1", None), f"{PORT_HEALTH}/tcp": ("127.0.0.1", None)})
    try:
        container.reload()
        ports = container.attrs["NetworkSettings"]["Ports"]
        api, health = (f"http://127.0.0.1:{ports[f'{p}/tcp'][0]['HostPort']}" for p in (PORT, PORT_HEALTH))
        report(f"runpod-lb container {container.name}: PORT on {api}, PORT_HEALTH on {health}")
        seen = pings(f"{health}/ping", running(container), timeout=180)
        report(f"/ping answered {seen}")
        yield {"api": Api(api, api_key), "health": health, "pings": seen, "container": container}
    finally:
        try:
            container.stop(timeout=20)
        finally:
            container.remove(force=True)


def running(container: Any) -> Callable[[], str | None]:
    """For pings(): None while the container runs, else its log's end."""
    def check() -> str | None:
        container.reload()
        return None if container.status in ("created", "running") else container.logs()[-3000:].decode(errors="replace")
    return check


def test_docker_inspect_shows_what_the_build_baked(engine: Any, image: ImageUnderTest, hub: Hub,
                                                   pack: GitPackServer) -> None:
    labels = our_labels(engine, image.ref)
    every = engine.images.get(image.ref).labels
    assert set(LABEL_ARGS) <= set(every), dump(every)  # all set, the unknown ones empty

    models = json.loads(labels["comfyui-worker.models"])
    assert models == [{"path": dest, "sha256": sha} for dest, (sha, _) in hub.files.items()], dump(labels)
    assert json.loads(labels["comfyui-worker.custom-nodes"]) == [{"name": PACK_NAME, "commit": pack.commit}]
    assert labels["org.opencontainers.image.version"] == __version__
    # this checkout's commit when the build ran (-dirty: tracked files were modified)
    revision = re.fullmatch(r"([0-9a-f]{40})(-dirty)?", labels["org.opencontainers.image.revision"])
    assert revision, dump(labels)
    assert subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{revision.group(1)}^{{commit}}"]).returncode == 0
    created = datetime.strptime(labels["org.opencontainers.image.created"], "%Y-%m-%dT%H:%M:%SZ")
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    assert now - timedelta(seconds=image.build.seconds + 120) <= created <= now + timedelta(seconds=5)
    # the stand-in is a local ComfyUI source: no git ref or commit to say, and no label claims one
    assert "comfyui-worker.comfyui.ref" not in labels and "comfyui-worker.comfyui.commit" not in labels
    assert re.search(r">> labels: \d+ set in (under )?\d+ s", image.build.log)  # make build said what it did


def test_runpod_lb_pings_204_then_200_serves_runsync_and_info_matches_the_labels(
        engine: Any, image: ImageUnderTest, hub: Hub, pack: GitPackServer, lb_worker: dict[str, Any]) -> None:
    assert lb_worker["pings"] == [204, 200], lb_worker["pings"]
    api: Api = lb_worker["api"]
    status, body = api.request("POST", "/runsync", {"input": {"workflow": GRAPH}}, timeout=120)
    assert status == 200 and body["status"] == "COMPLETED", dump(body)
    assert api.request("GET", "/info", key=None)[0] == 401  # the key is honoured when set, even behind RunPod

    info = api.ok("GET", "/info")

    labels = our_labels(engine, image.ref)
    assert info["labels"] == labels, dump({"info": info["labels"], "inspect": labels})
    assert info["build"]["record"] == "found", dump(info["build"])
    assert info["build"]["built_at"] == labels["org.opencontainers.image.created"]
    assert info["worker"] == {"version": __version__, "revision": labels["org.opencontainers.image.revision"],
                              "source": labels.get("org.opencontainers.image.source"), "mode": "runpod-lb"}
    assert info["models"] == [{"name": name, "path": dest, "sha256": sha, "size": len(data)}
                              for name, (dest, (sha, data)) in zip(
                                  ("image-test-checkpoint", "image-test-lora", "image-test-insightface-detector"),
                                  hub.files.items())], dump(info["models"])
    assert info["custom_nodes"] == [{"name": PACK_NAME, "url": pack.url, "commit": pack.commit}]
