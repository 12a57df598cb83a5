"""What a change costs on the wire: push the CPU image to a real registry, change one thing, rebuild, push, pull.

The CPU variant of docker/Dockerfile (stand-in ComfyUI, a git node pack, small generated models from the loopback
hub) is built with `make build` (so with one layer per model, scripts/model_layers.py), pushed with `make push`
through a counting proxy to Debian's docker-registry on loopback, and pulled by a second engine that has the
previous tag (dockerd's classic layer store) and by a containerd that has it (a content-addressed store). Then one thing changes at a time -- the worker's code, a workflow, the node pack, the ComfyUI
source, TORCH_PACKAGES (a small stand-in package), one model, a new model -- and the bytes each push uploads and
each pull downloads are counted at the proxy, split into model layers and the rest. The table is printed (and
written to the session's work folder); docs/image.md shows it.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.hubserver.harness import HubServer, sha256_of
from tests.image.imagekit import DOCKER_CLI, ROOT, GitPackServer, make_build_args, run_build, stage_context
from tests.image.registrykit import (
    ContainerdPuller,
    CountingProxy,
    PullerEngine,
    Registry,
    downloaded_blobs,
    have_registry,
    uploaded_blobs,
)

pytestmark = pytest.mark.timeout(1200)

REPO = "acme/layer-models"
NAME = "comfyui-worker-layertest"
KIB, MIB = 1024, 1024 * 1024
MODELS = {"alpha": 3 * MIB, "beta": 2 * MIB, "gamma": 1 * MIB}  # manifest order = layer order
NEW_MODEL = ("delta", 1536 * KIB)
LAYER_MARGIN = 64 * KIB  # tar headers and gzip framing on top of an incompressible file
MODEL_LAYER_CMD = "COPY /out/models/ /opt/ComfyUI/models/"
TREE_LAYER_CMD = "COPY / / "  # the worker's venv and ComfyUI's source, copied whole from FROM-scratch stages
TORCH_LAYER_MARK = "python3 -m venv /opt/venv/comfyui"  # the reproducible torch step
STANDIN_TORCH = "six==1.17.0"  # a small package standing in for torch on the CPU image


@dataclass
class Step:
    change: str
    build_s: float
    push_s: float
    pull_s: float
    up_total: int
    up_models: int
    down_total: int
    down_models: int
    fetched: list[str]
    ctr_total: int = 0  # bytes the containerd puller downloaded
    ctr_models: int = 0
    ctr_blobs: dict[str, int] = field(default_factory=dict)
    ctr_model_blobs: dict[str, int] = field(default_factory=dict)
    up_model_blobs: dict[str, int] = field(default_factory=dict)
    up_blobs: dict[str, int] = field(default_factory=dict)
    down_model_blobs: dict[str, int] = field(default_factory=dict)


@dataclass
class Pushed:
    layers: list[tuple[str, int]]  # (digest, compressed size), bottom first
    models: list[str]  # the model layers' digests, in manifest order
    trees: list[str]  # the digests of the big layers above the models that a model change must not move:
    # torch's step and the two copied whole from FROM-scratch stages


class Rig:
    """The staged context, the servers, and the build -> push -> pull cycle of one change."""

    def __init__(self, work: Path, hub: HubServer, pack: GitPackServer, registry: Registry, proxy: CountingProxy,
                 puller: PullerEngine, ctr: ContainerdPuller, report: Callable[[str], None]) -> None:
        self.work, self.hub, self.pack, self.registry, self.proxy, self.puller = work, hub, pack, registry, proxy, puller
        self.ctr = ctr
        self.report = report
        self.models: dict[str, bytes] = {}
        self.torch = ""
        self.pack_commit = pack.commit
        self.context = stage_context(work / "context", "", "")
        self.steps: list[Step] = []
        self.pushed: list[Pushed] = []
        self.tags: list[str] = []

    def set_model(self, name: str, data: bytes) -> None:
        self.models[name] = data
        self.hub.add_hf(REPO, f"{name}.safetensors", data)

    def write_manifests(self) -> None:
        entries = "".join(f"""  - name: {name}
    folder: checkpoints
    filename: {name}.safetensors
    hf: {{repo: {REPO}, file: {name}.safetensors, revision: main}}
    sha256: "{sha256_of(data)}"
    size: {len(data)}
""" for name, data in self.models.items())
        (self.context / "models.yaml").write_text(f"version: 1\nmodels:\n{entries}")
        (self.context / "custom_nodes.txt").write_text(f"{self.pack.url}@{self.pack_commit}\n")

    def cycle(self, change: str) -> Step:
        """Build the context as it is now, push it, pull it on the puller; record the bytes."""
        self.write_manifests()
        tag = f"s{len(self.tags)}"
        extra = (f"--build-arg TORCH_PACKAGES={self.torch}",) if self.torch else ()
        cmd = [*make_build_args(self.context, tag, self.hub.endpoint, None, extra_args=extra), "LABELS=no",
               f"IMAGE={NAME}", f"REGISTRY={self.proxy.host}"]
        self.hub.reset()
        build = run_build(cmd, self.work / f"build-{tag}.log", lambda line: None, 900)
        if not build.ok:
            pytest.fail(f"{change}: the build failed (exit {build.returncode}); last lines of "
                        f"{self.work / f'build-{tag}.log'}:\n{build.tail()}", pytrace=False)
        fetched = sorted({e["path"].rsplit("/", 1)[-1] for e in self.hub.log()
                          if e["method"] == "GET" and e["status"] in (200, 206)})
        ref = f"{self.proxy.host}/{NAME}:{tag}"
        self.tags.append(ref)
        self.proxy.take()
        t0 = time.monotonic()
        push = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "push", f"DOCKER={DOCKER_CLI}",
                               f"REGISTRY={self.proxy.host}", f"IMAGE={NAME}", f"TAG={tag}"],
                              text=True, capture_output=True, timeout=600)
        assert push.returncode == 0, f"{change}: make push failed:\n{push.stdout[-2000:]}{push.stderr[-2000:]}"
        (self.work / f"push-{tag}.log").write_text(push.stdout + push.stderr)
        # make push said what it pushed, with sizes (scripts/push_report.py)
        assert re.search(r"^>> push: \d+ layer\(s\) uploaded \(\d[\d.]* [KMG]?B\), \d+ already", push.stdout, re.M), \
            push.stdout[-1500:]
        up = self.proxy.take()
        t1 = time.monotonic()
        self.puller.docker("pull", ref)
        down = self.proxy.take()
        t2 = time.monotonic()
        self.ctr.pull(ref)
        by_ctr = self.proxy.take()
        pushed = self.manifest(tag)
        self.pushed.append(pushed)
        ups, downs, ctr_blobs = uploaded_blobs(up), downloaded_blobs(down), downloaded_blobs(by_ctr)
        models = set(pushed.models)
        step = Step(change=change, build_s=build.seconds, push_s=t1 - t0, pull_s=t2 - t1,
                    up_total=sum(e.up for e in up), up_models=sum(n for d, n in ups.items() if d in models),
                    down_total=sum(e.down for e in down), down_models=sum(n for d, n in downs.items() if d in models),
                    fetched=fetched, up_model_blobs={d: n for d, n in ups.items() if d in models},
                    down_model_blobs={d: n for d, n in downs.items() if d in models}, up_blobs=dict(ups),
                    ctr_total=sum(e.down for e in by_ctr), ctr_blobs=ctr_blobs,
                    ctr_models=sum(n for d, n in ctr_blobs.items() if d in models),
                    ctr_model_blobs={d: n for d, n in ctr_blobs.items() if d in models})
        self.steps.append(step)
        self.report(f"{change}: built in {step.build_s:.0f} s; pushed {human(step.up_total)} "
                    f"({human(step.up_models)} of models), pulled {human(step.down_total)} "
                    f"({human(step.down_models)} of models), pulled by containerd {human(step.ctr_total)} "
                    f"({human(step.ctr_models)} of models); fetched from the hub: {', '.join(fetched) or 'nothing'}")
        return step

    def manifest(self, tag: str) -> Pushed:
        """The pushed manifest and image config, read from the registry directly (not through the proxy)."""
        base = f"http://127.0.0.1:{self.registry.port}/v2/{NAME}"
        req = urllib.request.Request(f"{base}/manifests/{tag}", headers={
            "Accept": "application/vnd.docker.distribution.manifest.v2+json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            manifest = json.load(r)
        with urllib.request.urlopen(f"{base}/blobs/{manifest['config']['digest']}", timeout=30) as r:
            config = json.load(r)
        layers = [(layer["digest"], layer["size"]) for layer in manifest["layers"]]
        made = [h for h in config["history"] if not h.get("empty_layer")]
        assert len(made) == len(layers), (len(made), len(layers))
        models = [digest for (digest, _), h in zip(layers, made) if h.get("created_by", "").startswith(MODEL_LAYER_CMD)]
        trees = [digest for (digest, _), h in zip(layers, made)
                 if h.get("created_by", "").startswith(TREE_LAYER_CMD) or TORCH_LAYER_MARK in h.get("created_by", "")]
        return Pushed(layers=layers, models=models, trees=trees)


def payload(size: int, seed: int) -> bytes:
    """Incompressible bytes (random, seeded): a model layer is then as large as its file on the wire too."""
    return random.Random(seed).randbytes(size)


def human(n: int) -> str:
    return f"{n / MIB:.2f} MiB" if n >= 100 * KIB else f"{n / KIB:.1f} KiB"


def table(steps: list[Step]) -> str:
    rows = ["| change | build, push, pull (s) | pushed: all | pushed: models | pulled: all | pulled: models | "
            "containerd pulled: all | containerd pulled: models | fetched from the hub |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    rows += [f"| {s.change} | {s.build_s:.0f}, {s.push_s:.0f}, {s.pull_s:.0f} | {human(s.up_total)} | "
             f"{human(s.up_models)} | {human(s.down_total)} | {human(s.down_models)} | {human(s.ctr_total)} | "
             f"{human(s.ctr_models)} | {', '.join(s.fetched) or '-'} |"
             for s in steps]
    return "\n".join(rows)


@pytest.fixture(scope="module")
def rig(engine: Any, base_image: str, tmp_path_factory: pytest.TempPathFactory,
        report: Callable[[str], None]) -> Iterator[Rig]:
    if not have_registry():
        from tests.image.imagekit import unavailable

        unavailable("no /usr/bin/docker-registry", "install it: apt-get install docker-registry")
    work = tmp_path_factory.mktemp("layers")
    hub = HubServer(work / "hub").start()
    pack = GitPackServer(work / "gitpack").start()
    registry = Registry(work / "registry").start()
    proxy = CountingProxy(registry.port).start()
    puller = PullerEngine(work / "puller").start()
    ctr = ContainerdPuller(work / "ctr-puller").start()
    rig = Rig(work, hub, pack, registry, proxy, puller, ctr, report)
    try:
        yield rig
    finally:
        (work / "table.md").write_text(table(rig.steps) + "\n")
        report(f"the table ({work / 'table.md'}):\n{table(rig.steps)}")
        for ref in rig.tags:
            subprocess.run([DOCKER_CLI, "image", "rm", ref], capture_output=True)
        ctr.stop()
        puller.stop()
        proxy.stop()
        registry.stop()
        pack.stop()
        hub.stop()


def later_commit(pack: GitPackServer) -> str:
    """The node pack's second commit (after the pinned one): a node-pack change of the custom_nodes.txt pin."""
    out = subprocess.run(["git", "-C", str(pack.root / "work"), "rev-parse", "HEAD"], text=True, capture_output=True,
                         check=True)
    return out.stdout.strip()


def test_a_change_moves_only_its_own_layers(rig: Rig, report: Callable[[str], None]) -> None:
    started = time.monotonic()
    seed = int(time.time())  # fresh model bytes each session: the build really downloads them
    for i, (name, size) in enumerate(MODELS.items()):
        rig.set_model(name, payload(size, seed=seed + i))

    first = rig.cycle("first push (3 models)")
    assert sorted(first.fetched) == sorted(f"{n}.safetensors" for n in MODELS), first.fetched
    assert len(rig.pushed[0].models) == len(MODELS), rig.pushed[0]
    # one layer per model file, none larger than its file plus a small margin
    sizes = dict(rig.pushed[0].layers)
    for digest, (name, data) in zip(rig.pushed[0].models, rig.models.items()):
        assert len(data) <= sizes[digest] <= len(data) + LAYER_MARGIN, (name, sizes[digest], len(data))
    assert first.down_models == sum(sizes[d] for d in rig.pushed[0].models)  # the puller had nothing

    def no_model_bytes(change: str, edit: Callable[[], None]) -> None:
        before = rig.pushed[-1].models
        edit()
        step = rig.cycle(change)
        assert rig.pushed[-1].models == before, f"{change}: the model layers' digests changed"
        assert step.up_models == 0 and step.down_models == 0 and step.ctr_models == 0, step
        assert step.fetched == [], f"{change}: the build fetched {step.fetched}"
        assert step.up_total > 0 and step.down_total > 0, f"{change}: nothing moved at all; did the change land? {step}"

    ctx = rig.context
    no_model_bytes("worker code", lambda: (ctx / "supervisor" / "__init__.py").open("a").write("# layer test\n"))
    no_model_bytes("a workflow", lambda: (ctx / "workflows" / "layer-test.json").write_text(
        (ctx / "workflows" / next(p.name for p in (ctx / "workflows").glob("*.json"))).read_text()))
    rig.pack_commit = later_commit(rig.pack)
    no_model_bytes("a node pack (new pin)", lambda: None)
    no_model_bytes("the ComfyUI source", lambda: (ctx / "tests" / "standin" / "LAYER_TEST.txt").write_text("x\n"))
    rig.torch = STANDIN_TORCH
    no_model_bytes(f"TORCH_PACKAGES={STANDIN_TORCH}", lambda: None)

    # One model changes: only its layer is new and uploaded; the others keep their digests. The build re-runs
    # every step above it, but torch's step, the worker's venv and ComfyUI's source come out byte for byte the
    # same: none of them is uploaded again.
    before = rig.pushed[-1].models
    trees = rig.pushed[-1].trees
    rig.set_model("beta", payload(MODELS["beta"], seed=seed + 100))
    step = rig.cycle("one model (beta, the 2nd of 3)")
    after = rig.pushed[-1].models
    assert step.fetched == ["beta.safetensors"], step.fetched
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert changed == [1], (before, after)
    sizes = dict(rig.pushed[-1].layers)
    assert step.up_model_blobs == {after[1]: sizes[after[1]]}, step.up_model_blobs
    assert len(trees) == 3 and rig.pushed[-1].trees == trees, (trees, rig.pushed[-1].trees)
    assert not set(trees) & set(step.up_blobs), "a layer above the models was uploaded again"
    # A docker pull keeps a layer only when every layer below it is the same (dockerd's layer store is a chain):
    # the model layers above the changed one come again; none below it.
    assert set(step.down_model_blobs) <= set(after[1:]) and after[1] in step.down_model_blobs, step.down_model_blobs
    assert after[0] not in step.down_model_blobs
    # containerd fetches by digest: the changed model's layer, no other model, and none of the three trees
    assert step.ctr_model_blobs == {after[1]: sizes[after[1]]}, step.ctr_model_blobs
    assert not set(trees) & set(step.ctr_blobs), "containerd downloaded a layer above the models again"

    # A new model, last in models.yaml: the build fetches only it; only its layer moves.
    rig.set_model(NEW_MODEL[0], payload(NEW_MODEL[1], seed=seed + 200))
    before = rig.pushed[-1].models
    step = rig.cycle("a new model (delta, last)")
    after = rig.pushed[-1].models
    assert step.fetched == ["delta.safetensors"], step.fetched
    assert after[:-1] == before and len(after) == len(before) + 1, (before, after)
    sizes = dict(rig.pushed[-1].layers)
    assert step.up_model_blobs == {after[-1]: sizes[after[-1]]}, step.up_model_blobs
    assert rig.pushed[-1].trees == trees and not set(trees) & set(step.up_blobs)
    assert step.down_model_blobs == {after[-1]: sizes[after[-1]]}, step.down_model_blobs
    assert step.ctr_model_blobs == {after[-1]: sizes[after[-1]]} and not set(trees) & set(step.ctr_blobs)
    assert sizes[after[-1]] <= NEW_MODEL[1] + LAYER_MARGIN
    report(f"registry layer test: {len(rig.steps)} builds, pushes and pulls in {time.monotonic() - started:.0f} s")
