"""The model fetcher against a real loopback server speaking the Hub protocol, plain HTTP and Civitai.

Every test runs scripts/fetch_models.py as its own process (as the Docker build does) against
tests/hubserver/server.py, and checks the files on disk and the requests the server saw.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
from tests.hubserver.harness import HubServer, payload, run_script, script_env, sha256_of

pytestmark = pytest.mark.timeout(120)

TOKEN = "hf_tok_3c1d9e7a5b2f4a6c8e0d"  # a value that must never appear in any output
CIVITAI = "civ_tok_9f8e7d6c5b4a3f2e1d0c"
SIZE = 700_000


@pytest.fixture
def hub(tmp_path: Path):
    with HubServer(tmp_path / "root", cdn=True, token=TOKEN, private=("acme/private",),
                   civitai_private=True, civitai_token=CIVITAI) as server:
        yield server


class Run:
    """One manifest + models dir + secrets dir, and a way to run the fetcher on them."""

    def __init__(self, tmp: Path, hub: HubServer) -> None:
        self.tmp = tmp
        self.hub = hub
        self.manifest = tmp / "models.yaml"
        self.models = tmp / "models"
        self.secrets = tmp / "secrets"
        self.secrets.mkdir(exist_ok=True)
        self.env = script_env(tmp, hub)
        self.outputs: list[str] = []

    def write(self, body: str) -> None:
        self.manifest.write_text("version: 1\nmodels:\n" + textwrap.indent(textwrap.dedent(body), "  "))

    def secret(self, name: str, value: str) -> None:
        (self.secrets / name).write_text(value + "\n")

    def fetch(self, *args: str, **env: str):
        return self._run(["--manifest", str(self.manifest), "--models-dir", str(self.models), *args], env)

    def lock(self, *args: str, **env: str):
        return self._run(["lock", "--manifest", str(self.manifest), *args], env)

    def _run(self, argv: list[str], env: dict[str, str]):
        result = run_script("fetch_models.py", argv, {**self.env, **env})
        self.outputs.append(result.stdout + result.stderr)
        return result

    def path(self, rel: str) -> Path:
        return self.models / rel

    def parts(self) -> list[Path]:
        return sorted(p for p in self.tmp.rglob("*.part"))


@pytest.fixture
def run(tmp_path: Path, hub: HubServer):
    r = Run(tmp_path, hub)
    yield r
    for out in r.outputs:  # whatever happened in the test: no token in any output
        assert TOKEN not in out and CIVITAI not in out


def _extra(lines: str) -> str:
    """More fields for an entry, indented under it, each on its own line."""
    return "".join(f"  {line.strip()}\n" for line in lines.splitlines() if line.strip())


def hf_entry(name: str, repo: str, file: str, dest: str, extra: str = "") -> str:
    folder, filename = dest.split("/", 1)
    return f"""\
- name: {name}
  folder: {folder}
  filename: {filename}
  hf: {{repo: {repo}, file: {file}}}
{_extra(extra)}"""


def url_entry(name: str, url: str, dest: str, sha: str, extra: str = "") -> str:
    folder, filename = dest.split("/", 1)
    return f"""\
- name: {name}
  folder: {folder}
  filename: {filename}
  url: {url}
  sha256: {sha}
{_extra(extra)}"""


# ------------------------------------------------------------------------------------------------ integrity


def test_hash_mismatch_deletes_the_file_and_names_entry_and_both_hashes(run: Run, hub: HubServer) -> None:
    data = payload(SIZE)
    hub.add_file("lora.safetensors", data)
    wrong = hashlib.sha256(b"something else").hexdigest()
    run.write(url_entry("my-lora", hub.url("/files/lora.safetensors"), "loras/lora.safetensors", wrong))

    result = run.fetch()

    assert result.returncode == 1
    err = result.stderr
    assert "entry 1 (my-lora)" in err and "sha256 mismatch" in err
    assert f"expected {wrong}" in err and f"got {sha256_of(data)}" in err
    assert not run.path("loras/lora.safetensors").exists()
    assert run.parts() == []  # the bad bytes are gone, not kept for a resume


def test_hub_sha256_is_enforced_when_the_manifest_has_none(run: Run, hub: HubServer) -> None:
    data = payload(SIZE, seed=1)
    sha = hub.add_hf("acme/models", "unet/model.safetensors", data)
    run.write(hf_entry("unet", "acme/models", "unet/model.safetensors", "checkpoints/unet.safetensors"))
    hub.faults(corrupt=1, times=-1)  # same size, one byte flipped: only a hash can tell

    bad = run.fetch("--retries", "0")

    assert bad.returncode == 1
    assert "entry 1 (unet)" in bad.stderr and f"expected {sha} (from the hub's LFS metadata)" in bad.stderr
    assert not run.path("checkpoints/unet.safetensors").exists() and run.parts() == []

    hub.reset()
    good = run.fetch()
    assert good.returncode == 0, good.stderr
    assert sha256_of(run.path("checkpoints/unet.safetensors").read_bytes()) == sha


def test_manifest_hash_that_the_hub_contradicts_fails_before_downloading(run: Run, hub: HubServer) -> None:
    hub.add_hf("acme/models", "a.safetensors", payload(SIZE))
    pinned = hashlib.sha256(b"an older upload").hexdigest()
    run.write(hf_entry("a", "acme/models", "a.safetensors", "checkpoints/a.safetensors", f"sha256: {pinned}"))

    result = run.fetch()

    assert result.returncode == 1
    assert f"manifest pins {pinned}" in result.stderr
    assert hub.body_requests() == []


def test_lying_etag_and_size_in_resolve_metadata_do_not_break_verification(run: Run, hub: HubServer) -> None:
    data = payload(SIZE, seed=2)
    hub.add_hf("acme/models", "b.safetensors", data)
    hub.faults(wrong_etag=1, wrong_size=1)
    run.write(hf_entry("b", "acme/models", "b.safetensors", "checkpoints/b.safetensors"))

    result = run.fetch()

    assert result.returncode == 0, result.stderr
    assert "disagrees with the hub's LFS sha256" in result.stderr
    assert run.path("checkpoints/b.safetensors").read_bytes() == data


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("source", ["hf-via-cdn", "plain-url"])
def test_download_cut_mid_body_resumes_from_the_kept_part_on_the_next_call(run: Run, hub: HubServer,
                                                                           source: str) -> None:
    data = payload(SIZE, seed=3)
    if source == "hf-via-cdn":
        hub.add_hf("acme/models", "big.safetensors", data)
        run.write(hf_entry("big", "acme/models", "big.safetensors", "checkpoints/big.safetensors"))
    else:
        sha = hub.add_file("big.safetensors", data)
        run.write(url_entry("big", hub.url("/files/big.safetensors"), "checkpoints/big.safetensors", sha))
    cut = 300_001
    hub.faults(cut_after=cut)

    first = run.fetch("--retries", "0")

    assert first.returncode == 1
    assert "kept in" in first.stderr and "for the next run" in first.stderr
    assert not run.path("checkpoints/big.safetensors").exists()
    [part] = run.parts()
    assert part.stat().st_size == cut

    hub.reset()
    second = run.fetch("--retries", "0")

    assert second.returncode == 0, second.stderr
    assert run.path("checkpoints/big.safetensors").read_bytes() == data
    [download] = hub.body_requests()
    assert download["range"] == f"bytes={cut}-" and download["status"] == 206
    assert download["sent"] == SIZE - cut
    assert run.parts() == []


def test_a_cut_inside_one_call_is_retried_with_range(run: Run, hub: HubServer) -> None:
    data = payload(SIZE, seed=4)
    hub.add_hf("acme/models", "c.safetensors", data)
    run.write(hf_entry("c", "acme/models", "c.safetensors", "checkpoints/c.safetensors"))
    hub.faults(cut_after=123_457)

    result = run.fetch("--retries", "2")

    assert result.returncode == 0, result.stderr
    assert "resuming at byte 123457" in result.stderr
    assert [r["range"] for r in hub.body_requests()] == [None, "bytes=123457-"]
    assert run.path("checkpoints/c.safetensors").read_bytes() == data


def test_a_clean_but_short_body_is_detected_by_size_and_resumed(run: Run, hub: HubServer) -> None:
    data = payload(SIZE, seed=5)
    hub.add_hf("acme/models", "d.safetensors", data)
    run.write(hf_entry("d", "acme/models", "d.safetensors", "checkpoints/d.safetensors"))
    hub.faults(truncate=200_000)

    result = run.fetch("--retries", "1")

    assert result.returncode == 0, result.stderr
    assert "the body ended after 200000" in result.stderr
    assert run.path("checkpoints/d.safetensors").read_bytes() == data


def test_a_server_that_ignores_range_is_handled_by_starting_over(run: Run, hub: HubServer) -> None:
    data = payload(SIZE, seed=6)
    sha = hub.add_file("e.safetensors", data)
    run.write(url_entry("e", hub.url("/files/e.safetensors"), "loras/e.safetensors", sha))
    hub.faults(cut_after=100_000)
    assert run.fetch("--retries", "0").returncode == 1
    hub.reset()
    hub.faults(ignore_range=1)

    result = run.fetch("--retries", "0")

    assert result.returncode == 0, result.stderr
    assert "ignored the Range request" in result.stderr
    assert run.path("loras/e.safetensors").read_bytes() == data


def test_transient_server_errors_are_retried(run: Run, hub: HubServer) -> None:
    data = payload(SIZE, seed=7)
    sha = hub.add_file("f.bin", data)
    run.write(url_entry("f", hub.url("/files/f.bin"), "upscale_models/f.bin", sha))
    hub.faults(status=503, times=2)

    result = run.fetch("--retries", "3")

    assert result.returncode == 0, result.stderr
    assert result.stderr.count("answered 503") == 2
    assert run.path("upscale_models/f.bin").read_bytes() == data


# ------------------------------------------------------------------------------------------------ secrets


def test_missing_secret_fails_a_required_entry_and_skips_an_optional_one(run: Run, hub: HubServer) -> None:
    hub.add_hf("acme/private", "p.safetensors", payload(SIZE))
    hub.add_civitai(4242, "civ.safetensors", payload(SIZE, seed=8))
    civ = f"""\
- name: civ
  folder: checkpoints
  filename: civ.safetensors
  civitai: {{version_id: 4242}}
  sha256: {'ab' * 32}
  secret: CIVITAI_TOKEN
  optional: true
"""
    run.write(civ)
    skipped = run.fetch()
    assert skipped.returncode == 0, skipped.stderr
    assert "skipping optional entry 1 (civ): its secret CIVITAI_TOKEN was not supplied" in skipped.stderr

    run.write(hf_entry("gated-ish", "acme/private", "p.safetensors", "checkpoints/p.safetensors",
                       "secret: HF_TOKEN") + civ)
    failed = run.fetch()
    assert failed.returncode == 1
    assert "entry 1 (gated-ish): needs secret HF_TOKEN, which was not supplied" in failed.stderr
    assert hub.log() == [] or all(e["path"].startswith("/_control") for e in hub.log())  # refused before any request


def test_private_repo_with_the_right_token_works_and_the_token_appears_nowhere(run: Run, hub: HubServer) -> None:
    data = payload(SIZE, seed=9)
    hub.add_hf("acme/private", "p.safetensors", data)
    civ = payload(SIZE, seed=10)
    civ_sha = hub.add_civitai(777, "civ.safetensors", civ)
    run.write(hf_entry("private", "acme/private", "p.safetensors", "checkpoints/p.safetensors", "secret: HF_TOKEN")
              + f"""\
- name: civ
  folder: checkpoints
  filename: civ.safetensors
  civitai: {{version_id: 777}}
  sha256: {civ_sha}
  secret: CIVITAI_TOKEN
""")
    run.secret("HF_TOKEN", TOKEN)  # a BuildKit secret file
    plan = run.fetch("--dry-run", CIVITAI_TOKEN=CIVITAI)  # the environment as the fallback
    assert plan.returncode == 0, plan.stderr
    assert "secret HF_TOKEN: secret file" in plan.stdout and "environment variable CIVITAI_TOKEN" in plan.stdout

    result = run.fetch("--jobs", "2", CIVITAI_TOKEN=CIVITAI)

    assert result.returncode == 0, result.stderr
    assert run.path("checkpoints/p.safetensors").read_bytes() == data
    assert run.path("checkpoints/civ.safetensors").read_bytes() == civ
    log = hub.log()
    assert any(e["method"] == "HEAD" and e["auth"] == "ok" for e in log)
    assert any(e["path"] == "/api/download/models/777" and e["auth"] == "ok" for e in log)
    cdn = [e for e in log if e["path"].startswith("/cdn/")]
    assert len(cdn) == 2 and all(e["auth"] == "none" for e in cdn)  # the token never follows to the CDN


def test_a_refused_token_is_reported_by_name_not_value(run: Run, hub: HubServer) -> None:
    hub.add_hf("acme/private", "p.safetensors", payload(SIZE))
    run.write(hf_entry("private", "acme/private", "p.safetensors", "checkpoints/p.safetensors", "secret: HF_TOKEN"))
    wrong = TOKEN[::-1]

    result = run.fetch(HF_TOKEN=wrong)

    assert result.returncode == 1
    assert "the token from secret HF_TOKEN was sent" in result.stderr
    assert wrong not in result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------ idempotence


def test_a_rerun_downloads_nothing(run: Run, hub: HubServer) -> None:
    a = payload(SIZE, seed=11)
    sha_a = hub.add_file("a.bin", a)
    hub.add_hf("acme/models", "b.safetensors", payload(SIZE, seed=12))
    run.write(url_entry("a", hub.url("/files/a.bin"), "vae/a.bin", sha_a)
              + hf_entry("b", "acme/models", "b.safetensors", "checkpoints/b.safetensors"))
    assert run.fetch().returncode == 0
    assert len(hub.body_requests()) == 2
    hub.reset()
    before = {p: p.stat().st_mtime_ns for p in run.models.rglob("*") if p.is_file()}

    again = run.fetch()

    assert again.returncode == 0, again.stderr
    assert "2 present" in again.stderr
    assert hub.body_requests() == []
    # the url entry (hash in the manifest) needs no request at all; the hf one only asks the hub for its hash
    assert not any(e["path"].startswith("/files/") for e in hub.log())
    assert {p: p.stat().st_mtime_ns for p in run.models.rglob("*") if p.is_file()} == before


def test_a_present_file_with_other_bytes_is_replaced(run: Run, hub: HubServer) -> None:
    data = payload(SIZE, seed=13)
    sha = hub.add_file("g.bin", data)
    run.write(url_entry("g", hub.url("/files/g.bin"), "embeddings/g.bin", sha))
    run.path("embeddings").mkdir(parents=True)
    run.path("embeddings/g.bin").write_bytes(b"stale")

    result = run.fetch()

    assert result.returncode == 0, result.stderr
    assert "replacing it" in result.stderr
    assert run.path("embeddings/g.bin").read_bytes() == data


def test_a_shared_cache_keyed_by_sha256_serves_a_second_tree(run: Run, hub: HubServer, tmp_path: Path) -> None:
    data = payload(SIZE, seed=14)
    sha = hub.add_file("h.bin", data)
    run.write(url_entry("h", hub.url("/files/h.bin"), "controlnet/h.bin", sha))
    cache = tmp_path / "cache"
    assert run.fetch("--cache", str(cache)).returncode == 0
    assert (cache / "sha256" / sha).read_bytes() == data
    hub.reset()

    second = run_script("fetch_models.py", ["--manifest", str(run.manifest), "--models-dir", str(tmp_path / "other"),
                                            "--cache", str(cache)], run.env)

    assert second.returncode == 0, second.stderr
    assert "1 cache" in second.stderr
    assert (tmp_path / "other" / "controlnet" / "h.bin").read_bytes() == data
    assert hub.body_requests() == []


def test_parallel_downloads_all_verify(run: Run, hub: HubServer) -> None:
    body = ""
    expected = {}
    for i in range(4):
        data = payload(SIZE + i, seed=20 + i)
        hub.add_hf("acme/models", f"m{i}.safetensors", data)
        body += hf_entry(f"m{i}", "acme/models", f"m{i}.safetensors", f"loras/m{i}.safetensors")
        expected[f"loras/m{i}.safetensors"] = data
    run.write(body)
    hub.faults(rate=2_000_000)  # slow enough that the four overlap

    result = run.fetch("--jobs", "4", "--progress", "lines", FETCH_PROGRESS_INTERVAL_S="0.1")

    assert result.returncode == 0, result.stderr
    for rel, data in expected.items():
        assert run.path(rel).read_bytes() == data
    assert "fetch_models: progress" in result.stderr


# ------------------------------------------------------------------------------------------------ dry run


def test_dry_run_prints_the_plan_and_total_size_without_network(run: Run, hub: HubServer) -> None:
    run.write(url_entry("x", hub.url("/files/x.bin"), "vae/x.bin", "a" * 64, "size: 1048576")
              + hf_entry("y", "acme/models", "y.safetensors", "checkpoints/y.safetensors", "size: 2097152")
              + hf_entry("z", "acme/models", "z.safetensors", "checkpoints/z.safetensors"))

    result = run.fetch("--dry-run")

    assert result.returncode == 0, result.stderr
    assert "entry 1 (x): vae/x.bin" in result.stdout
    assert "total: 3 file(s), 3.0 MiB + 1 file(s) of unknown size" in result.stdout
    assert hub.log() == []
    assert not run.models.exists()


def test_a_manifest_size_the_source_contradicts_fails_before_downloading(run: Run, hub: HubServer) -> None:
    hub.add_hf("acme/models", "s.safetensors", payload(SIZE))
    run.write(hf_entry("s", "acme/models", "s.safetensors", "vae/s.safetensors", f"size: {SIZE + 1}"))

    result = run.fetch()

    assert result.returncode == 1
    assert f"entry 1 (s): the manifest says {SIZE + 1} bytes but" in result.stderr and f"has {SIZE}" in result.stderr
    assert hub.body_requests() == []


def test_the_output_filter_masks_every_known_secret_value(capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from buildlib.common import Redactor, redacted_stdio

    redact = Redactor()
    redact.add(TOKEN, None, "ab")  # too short to mask: it would garble every line
    with redacted_stdio(redact):
        print(f"Authorization: Bearer {TOKEN}")
        print(f"oops {TOKEN[:-1]} ab", file=sys.stderr)

    out, err = capsys.readouterr()
    assert out == "Authorization: Bearer ***\n"
    assert err == f"oops {TOKEN[:-1]} ab\n"


# ------------------------------------------------------------------------------------------------ record


def test_the_record_lists_what_was_verified_downloaded_or_already_present(run: Run, hub: HubServer,
                                                                            tmp_path: Path) -> None:
    a, b = payload(SIZE, seed=21), payload(SIZE // 2, seed=22)
    sha_a = hub.add_file("ra.bin", a)
    hub.add_hf("acme/models", "rb.safetensors", b)
    run.write(url_entry("ra", hub.url("/files/ra.bin"), "vae/ra.bin", sha_a)
              + hf_entry("rb", "acme/models", "rb.safetensors", "checkpoints/sub/rb.safetensors"))
    record = tmp_path / "out" / "models-record.json"
    expected = {"models": [
        {"name": "ra", "path": "vae/ra.bin", "sha256": sha_a, "size": len(a)},
        # the hub's LFS sha256 (the manifest pins none) is what was enforced, so what is recorded
        {"name": "rb", "path": "checkpoints/sub/rb.safetensors", "sha256": sha256_of(b), "size": len(b)}]}

    first = run.fetch("--record", str(record))
    assert first.returncode == 0, first.stderr
    assert json.loads(record.read_text()) == expected
    record.unlink()
    again = run.fetch("--record", str(record))  # present files are hashed again, so recorded again

    assert again.returncode == 0 and "2 present" in again.stderr, again.stderr
    assert json.loads(record.read_text()) == expected


def test_a_failed_fetch_writes_no_record(run: Run, hub: HubServer, tmp_path: Path) -> None:
    sha = hub.add_file("rc.bin", payload(SIZE, seed=23))
    assert sha != sha256_of(b"other bytes")
    run.write(url_entry("rc", hub.url("/files/rc.bin"), "vae/rc.bin", sha256_of(b"other bytes")))
    record = tmp_path / "models-record.json"

    result = run.fetch("--record", str(record))

    assert result.returncode == 1 and "sha256 mismatch" in result.stderr, result.stderr
    assert not record.exists()
