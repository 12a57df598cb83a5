"""models.yaml and custom_nodes.txt: every error names the file, the entry (or line), the field and what is
accepted; the shipped defaults are valid and describe the image the issue asks for."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.hubserver.harness import run_script, script_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from buildlib import manifest as mf  # noqa: E402

GOOD = {"folder": "checkpoints", "filename": "a.safetensors", "hf": {"repo": "org/name", "file": "a.safetensors"}}


def yaml_of(*entries: str) -> str:
    return "version: 1\nmodels:\n" + "".join(textwrap.indent(textwrap.dedent(e), "  ") for e in entries)


def problems_of(text: str) -> list[str]:
    with pytest.raises(mf.ManifestError) as info:
        mf.parse_manifest(text, "conf/models.yaml")
    return info.value.problems


# ------------------------------------------------------------------------------------------------ models.yaml


@pytest.mark.parametrize(("entry", "field", "fragment"), [
    ("- {folder: chekpoints, filename: a.safetensors, hf: {repo: o/n, file: a}}", "folder", "not a known model folder"),
    ("- {name: x, folder: loras, filename: a, hf: {repo: o/n, file: a}, sha256: abc}", "sha256", "not a sha256"),
    ("- {name: x, folder: loras, filename: a}", "hf/url/civitai", "no source"),
    ("- {name: x, folder: loras, filename: a, hf: {repo: o/n, file: a}, url: 'https://h/a'}", "hf/url/civitai",
     "several sources (hf, url)"),
    ("- {name: x, folder: loras, filename: a, hf: {repo: nope, file: a}}", "hf.repo", "not a repository id"),
    ("- {name: x, folder: loras, filename: a, hf: {repo: o/n, file: a, revision: 1234}}", "hf.revision",
     "quote it"),
    ("- {name: x, folder: loras, filename: a, hf: {repo: o/n, file: a, branch: main}}", "hf.branch",
     "unknown field"),
    ("- {name: x, folder: loras, filename: a, url: 'https://h/a?token=abc', sha256: " + "a" * 64 + "}", "url",
     "credential"),
    ("- {name: x, folder: loras, filename: a, url: 'ftp://h/a', sha256: " + "a" * 64 + "}", "url",
     "not an http(s) URL"),
    ("- {name: x, folder: loras, filename: a, civitai: {version_id: 'abc'}}", "civitai.version_id",
     "not a model version id"),
    ("- {name: x, folder: loras, filename: ../a, hf: {repo: o/n, file: a}}", "filename", "'..'"),
    ("- {name: x, folder: loras, filename: a, hf: {repo: o/n, file: a}, size: -3}", "size", "positive integer"),
    ("- {name: x, folder: loras, filename: a, hf: {repo: o/n, file: a}, secret: hf_token}", "secret",
     "not a secret name"),
    ("- {name: x, folder: loras, filename: a, hf: {repo: o/n, file: a}, optional: true}", "optional",
     "needs a 'secret'"),
    ("- {name: x, folder: loras, filname: a, hf: {repo: o/n, file: a}}", "filname", "unknown field"),
])
def test_an_error_names_file_entry_field_and_what_is_accepted(entry: str, field: str, fragment: str) -> None:
    text = yaml_of("- {name: ok, folder: vae, filename: v.safetensors, hf: {repo: o/n, file: v}}\n", entry + "\n")

    problems = problems_of(text)

    match = [p for p in problems if f"field '{field}'" in p]
    assert match, problems
    assert match[0].startswith("conf/models.yaml: entry 2 (")
    assert fragment in match[0] and "; accepted: " in match[0]


def test_every_problem_is_reported_at_once() -> None:
    text = yaml_of("- {name: a, folder: nope, filename: a, hf: {repo: o/n, file: a}}\n",
                   "- {name: b, folder: loras, filename: b, url: 'x', sha256: 1}\n")

    problems = problems_of(text)

    assert len(problems) == 3
    assert [p.split(": ")[1] for p in problems] == ["entry 1 (a)", "entry 2 (b)", "entry 2 (b)"]


def test_duplicates_and_top_level_mistakes_are_named() -> None:
    dup = yaml_of("- {name: a, folder: loras, filename: x.safetensors, hf: {repo: o/n, file: a}}\n",
                  "- {name: b, folder: loras, filename: x.safetensors, hf: {repo: o/n, file: b}}\n")
    assert "is also the destination of entry 1" in problems_of(dup)[0]
    assert "field 'models'" in problems_of("version: 1\nmodels: {}\n")[0]
    assert "top level: field 'modles': unknown key" in problems_of("version: 1\nmodles: []\nmodels: []\n")[0]
    [syntax] = problems_of("models:\n  - {name: a\n")
    assert syntax.startswith("conf/models.yaml: line ") and "not valid YAML" in syntax


def test_extra_folders_admit_a_custom_node_folder() -> None:
    text = "version: 1\nextra_folders: [my_nodes_models]\nmodels:\n" \
           "  - {folder: my_nodes_models, filename: m.pt, hf: {repo: o/n, file: m.pt}}\n"

    [entry] = mf.parse_manifest(text).entries

    assert entry.folder == "my_nodes_models" and entry.name == "my_nodes_models/m.pt"


def test_url_and_civitai_entries_need_a_sha256_before_fetching() -> None:
    m = mf.parse_manifest(yaml_of("- {name: c, folder: checkpoints, filename: c, civitai: {version_id: 5}}\n"),
                          "models.yaml")

    [problem] = mf.missing_hashes(m)

    assert problem.startswith("models.yaml: entry 1 (c): field 'sha256': missing; required for civitai sources")
    assert "lock" in problem


def test_the_check_command_reports_errors_with_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text(yaml_of("- {name: a, folder: checkpoint, filename: a, hf: {repo: o/n, file: a}}\n"))

    result = run_script("fetch_models.py", ["check", "--manifest", str(bad)], script_env(tmp_path))

    assert result.returncode == 2
    assert f"{bad}: entry 1 (a): field 'folder': 'checkpoint' is not a known model folder" in result.stderr


def test_the_default_manifest_is_valid_and_bakes_what_the_image_needs() -> None:
    m = mf.load_manifest(REPO / "models.yaml")
    by_dest = {e.destination: e for e in m.entries}

    hf = {dest: (e.source.repo, e.source.file) for dest, e in by_dest.items() if isinstance(e.source, mf.HfSource)}
    assert hf == {
        "checkpoints/sd_xl_base_1.0.safetensors": ("stabilityai/stable-diffusion-xl-base-1.0",
                                                   "sd_xl_base_1.0.safetensors"),
        "ipadapter/ip-adapter-plus_sdxl_vit-h.safetensors": ("h94/IP-Adapter",
                                                             "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"),
        "ipadapter/ip-adapter-plus-face_sdxl_vit-h.safetensors": (
            "h94/IP-Adapter", "sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors"),
        "ipadapter/ip-adapter-faceid_sdxl.bin": ("h94/IP-Adapter-FaceID", "ip-adapter-faceid_sdxl.bin"),
        "loras/ip-adapter-faceid_sdxl_lora.safetensors": ("h94/IP-Adapter-FaceID",
                                                          "ip-adapter-faceid_sdxl_lora.safetensors"),
        "ipadapter/ip-adapter-faceid-plusv2_sdxl.bin": ("h94/IP-Adapter-FaceID", "ip-adapter-faceid-plusv2_sdxl.bin"),
        "loras/ip-adapter-faceid-plusv2_sdxl_lora.safetensors": ("h94/IP-Adapter-FaceID",
                                                                 "ip-adapter-faceid-plusv2_sdxl_lora.safetensors"),
        "clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": ("h94/IP-Adapter",
                                                                    "models/image_encoder/model.safetensors"),
        "clip_vision/CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors": ("h94/IP-Adapter",
                                                                       "sdxl_models/image_encoder/model.safetensors"),
    }
    civitai = by_dest["checkpoints/lustifySDXLNSFW_ggwpV7.safetensors"]
    assert civitai.source == mf.CivitaiSource(2155386)
    assert civitai.optional and civitai.secret == "CIVITAI_TOKEN"
    assert all(e.secret is None for e in m.entries if isinstance(e.source, mf.HfSource))  # public repos


def test_the_default_manifest_dry_run_skips_the_civitai_entry_without_its_token(tmp_path: Path) -> None:
    result = run_script("fetch_models.py", ["--dry-run", "--manifest", str(REPO / "models.yaml"),
                                            "--models-dir", str(tmp_path / "models")], script_env(tmp_path))

    assert result.returncode == 0, result.stderr
    assert "skipping optional entry 10 (lustify-sdxl-ggwp-v7): its secret CIVITAI_TOKEN was not supplied" \
        in result.stdout
    assert "total: 9 file(s)" in result.stdout


# ------------------------------------------------------------------------------------------------ custom_nodes.txt


COMMIT = "9d076a3df0d2763cef5510ec5ab807f6632c39f5"


def test_the_default_node_list_pins_ipadapter_plus() -> None:
    [pack] = mf.load_node_list(REPO / "custom_nodes.txt")

    assert (pack.url, pack.ref, pack.name) == ("https://github.com/cubiq/ComfyUI_IPAdapter_plus", COMMIT,
                                               "ComfyUI_IPAdapter_plus")


def test_node_lines_parse_urls_commits_extras_and_comments() -> None:
    text = f"""
    # a comment
    https://github.com/a/one.git@{COMMIT}   insightface==0.7.3 onnxruntime>=1.17   # why
    git@github.com:b/two.git@{COMMIT}

    file:///srv/packs/three@{COMMIT}
    """
    packs = mf.parse_node_list(textwrap.dedent(text))

    assert [(p.line, p.name, p.extras) for p in packs] == [
        (3, "one", ("insightface==0.7.3", "onnxruntime>=1.17")), (4, "two", ()), (6, "three", ())]


@pytest.mark.parametrize(("line", "fragment"), [
    ("https://github.com/a/pack@main", "'main' is a branch or tag, not a pinned commit"),
    ("https://github.com/a/pack@v1.2", "'v1.2' is a branch or tag"),
    ("https://github.com/a/pack@9d076a3", "'9d076a3' is an abbreviated commit"),
    ("https://github.com/a/pack", "has no '@<commit>'"),
    (f"https://github.com/a/pack@{COMMIT} --index-url=http://evil", "is not a pip requirement"),
    (f"ftp://x/pack@{COMMIT}", "is not a git URL"),
])
def test_bad_node_lines_name_file_line_and_field(line: str, fragment: str) -> None:
    with pytest.raises(mf.ManifestError) as info:
        mf.parse_node_list(f"# header\n{line}\n", "custom_nodes.txt")

    [problem] = info.value.problems
    assert problem.startswith("custom_nodes.txt: line 2") and "field '" in problem
    assert fragment in problem and "accepted: " in problem


def test_unpinned_refs_are_accepted_only_when_allowed() -> None:
    [pack] = mf.parse_node_list("https://github.com/a/pack@main\n", allow_unpinned=True)

    assert not pack.pinned and pack.ref == "main"


def test_two_lines_for_one_directory_are_refused() -> None:
    with pytest.raises(mf.ManifestError, match="installs into custom_nodes/pack, like line 1"):
        mf.parse_node_list(f"https://a/x/pack@{COMMIT}\nhttps://b/y/pack.git@{COMMIT}\n")


# ------------------------------------------------------------------------------------------------ lock's editor


LAYOUT = """\
version: 1   # schema
models:
  # block style
  - name: a
    folder: checkpoints
    filename: a.safetensors   # keep me
    hf:
      repo: o/a
      file: a.safetensors
  - {name: b, folder: loras, filename: b.safetensors, hf: {repo: o/b, file: b.safetensors, revision: main}}
  - name: c
    folder: vae
    filename: c.safetensors
    hf: {repo: o/c, file: c.safetensors}
"""

hexes = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
commits = st.text(alphabet="0123456789abcdef", min_size=40, max_size=40)


@settings(max_examples=60, deadline=None)
@given(shas=st.lists(hexes, min_size=3, max_size=3), revs=st.lists(commits, min_size=3, max_size=3),
       sizes=st.lists(st.integers(min_value=1, max_value=10**13), min_size=3, max_size=3))
def test_lock_edits_round_trip_and_keep_comments(shas: list[str], revs: list[str], sizes: list[int]) -> None:
    m = mf.parse_manifest(LAYOUT)
    changes = {i + 1: {"sha256": shas[i], "hf.revision": revs[i], "size": sizes[i]} for i in range(3)}

    text = mf.edit_manifest_text(LAYOUT, m, changes)

    after = mf.parse_manifest(text)
    for entry, sha, rev, size in zip(after.entries, shas, revs, sizes, strict=True):
        assert (entry.sha256, entry.source.revision, entry.size) == (sha, rev, size)
    for comment in ("# schema", "# block style", "# keep me"):
        assert comment in text
