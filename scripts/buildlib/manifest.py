"""The two files a user writes to describe their image: ``models.yaml`` and ``custom_nodes.txt``.

Both are parsed into small frozen dataclasses and validated completely before anything is downloaded or cloned:
every problem is reported at once, each naming the file, the entry (or line), the field, what was given and what
is accepted, so a user fixes their manifest in one go instead of one failed ``docker build`` per typo.
The reference for both formats is ``docs/manifest.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# ComfyUI's built-in model folder keys (folder_paths.py) and the keys common custom node packs register.
# A key is the directory under models/ that the file lands in.
BUILTIN_FOLDERS = (
    "checkpoints", "configs", "loras", "vae", "text_encoders", "clip", "diffusion_models", "unet",
    "clip_vision", "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "t2i_adapter",
    "gligen", "upscale_models", "hypernetworks", "photomaker", "classifiers", "model_patches", "audio_encoders",
)
CUSTOM_NODE_FOLDERS = (
    "ipadapter", "insightface", "instantid", "pulid", "ultralytics", "sams", "facerestore_models",
    "facedetection", "animatediff_models", "animatediff_motion_lora",
)
KNOWN_FOLDERS = BUILTIN_FOLDERS + CUSTOM_NODE_FOLDERS

ENTRY_KEYS = ("name", "folder", "filename", "hf", "url", "civitai", "sha256", "size", "secret", "optional")
SOURCE_KEYS = ("hf", "url", "civitai")
TOP_KEYS = ("version", "models", "extra_folders")
HF_KEYS = ("repo", "file", "revision", "type")
HF_REPO_TYPES = ("model", "dataset")
CIVITAI_KEYS = ("version_id",)

SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SECRET_RE = re.compile(r"[A-Z][A-Z0-9_]*")
FOLDER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
HF_REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
TOKENISH_QUERY = re.compile(r"(token|api[_-]?key|key|secret|signature|sig|password)", re.IGNORECASE)


def _yaml() -> Any:
    """PyYAML, imported only by the models.yaml functions: the node installer runs with ComfyUI's interpreter
    and needs nothing beyond the standard library."""
    import yaml

    return yaml


class ManifestError(ValueError):
    """A manifest or node list that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, file: str, problems: list[str]) -> None:
        self.file = file
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid {file} ({len(problems)} problem(s)):\n{lines}")


# ----------------------------------------------------------------------------------------------- models.yaml


@dataclass(frozen=True)
class HfSource:
    repo: str
    file: str
    revision: str = "main"
    repo_type: str = "model"

    def describe(self) -> str:
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        return f"hf:{prefix}{self.repo}@{self.revision}:{self.file}"


@dataclass(frozen=True)
class UrlSource:
    url: str

    def describe(self) -> str:
        parts = urlsplit(self.url)
        return f"url:{parts.scheme}://{parts.netloc}{parts.path}"


@dataclass(frozen=True)
class CivitaiSource:
    version_id: int

    def describe(self) -> str:
        return f"civitai:{self.version_id}"


Source = HfSource | UrlSource | CivitaiSource


@dataclass(frozen=True)
class ModelEntry:
    """One file to place at ``<models_dir>/<folder>/<filename>``."""

    index: int  # 1-based position in the file, for messages
    name: str
    folder: str
    filename: str
    source: Source
    sha256: str | None = None  # lower-case hex
    size: int | None = None
    secret: str | None = None
    optional: bool = False

    @property
    def destination(self) -> str:
        return f"{self.folder}/{self.filename}"

    @property
    def label(self) -> str:
        """How messages name the entry: position and name, so it can be found in the file."""
        return f"entry {self.index} ({self.name})"


@dataclass(frozen=True)
class Manifest:
    path: Path
    entries: tuple[ModelEntry, ...]
    extra_folders: tuple[str, ...] = ()


class _Problems:
    """Collects problems about one file, each formatted '<file>: <where>: field <f>: <what>; accepted: <how>'."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[str] = []

    def add(self, where: str, field_name: str | None, what: str, accepted: str | None = None) -> None:
        parts = [self.file, where]
        if field_name:
            parts.append(f"field '{field_name}'")
        text = ": ".join(parts) + f": {what}"
        if accepted:
            text += f"; accepted: {accepted}"
        self.items.append(text)

    def raise_if_any(self) -> None:
        if self.items:
            raise ManifestError(self.file, self.items)


def _show(value: Any) -> str:
    """A value as the user wrote it, shortened so a pasted blob does not flood the message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _rel_path_problem(value: Any) -> str | None:
    """Why a relative path (a file inside a repo or a models folder) is unsafe or malformed, or None."""
    if not isinstance(value, str) or not value.strip():
        return f"{_show(value)} is not a non-empty string"
    if value.startswith("/") or "\\" in value:
        return f"{_show(value)} must be a relative path with '/' separators"
    if any(part in ("", ".", "..") for part in value.split("/")):
        return f"{_show(value)} has an empty, '.' or '..' path segment"
    return None


def load_manifest(path: Path | str) -> Manifest:
    """Read and validate a models.yaml; raise :class:`ManifestError` listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(str(path), [f"{path}: cannot read the file: {exc.strerror or exc}"]) from None
    return parse_manifest(text, path)


def parse_manifest(text: str, path: Path | str = "models.yaml") -> Manifest:
    """Validate manifest text; ``path`` is only used to name the file in messages."""
    path = Path(path)
    problems = _Problems(str(path))
    yaml = _yaml()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(str(path), [f"{path}: {where}: not valid YAML: {problem}"]) from None
    if not isinstance(data, dict):
        problems.add("top level", None, f"is {type(data).__name__}, not a mapping", "a mapping with a 'models' list")
        problems.raise_if_any()
    for key in data:
        if key not in TOP_KEYS:
            problems.add("top level", str(key), "unknown key", ", ".join(TOP_KEYS))
    version = data.get("version", 1)
    if version != 1:
        problems.add("top level", "version", f"{_show(version)} is not supported", "1")
    extra = _extra_folders(data.get("extra_folders", []), problems)
    models = data.get("models")
    if not isinstance(models, list):
        problems.add("top level", "models", f"{_show(models)} is not a list", "a list of model entries")
        problems.raise_if_any()
    entries = [_entry(i, raw, problems, KNOWN_FOLDERS + extra) for i, raw in enumerate(models, start=1)]
    _check_unique(entries, problems)
    problems.raise_if_any()
    return Manifest(path=path, entries=tuple(e for e in entries if e is not None), extra_folders=extra)


def _extra_folders(value: Any, problems: _Problems) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and FOLDER_RE.fullmatch(v) for v in value):
        problems.add("top level", "extra_folders", f"{_show(value)} is not a list of folder names",
                     "a list of names made of letters, digits, '_', '-' and '.'")
        return ()
    return tuple(value)


def _entry(index: int, raw: Any, problems: _Problems, folders: tuple[str, ...]) -> ModelEntry | None:
    if not isinstance(raw, dict):
        problems.add(f"entry {index}", None, f"is {_show(raw)}, not a mapping", "a mapping with folder, filename and a source")
        return None
    name = raw.get("name")
    if name is None:
        name = f"{raw.get('folder')}/{raw.get('filename')}"
    where = f"entry {index} ({name})"
    before = len(problems.items)
    for key in raw:
        if key not in ENTRY_KEYS:
            problems.add(where, str(key), "unknown field", ", ".join(ENTRY_KEYS))
    if not isinstance(name, str) or not name.strip():
        problems.add(where, "name", f"{_show(name)} is not a non-empty string", "a short unique name")
    folder = _folder(raw.get("folder"), where, problems, folders)
    filename = raw.get("filename")
    if (why := _rel_path_problem(filename)) is not None:
        problems.add(where, "filename", why, "a file name, optionally under sub-folders (a/b.safetensors)")
    source = _source(raw, where, problems)
    sha256 = _sha256(raw.get("sha256"), where, problems)
    size = raw.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        problems.add(where, "size", f"{_show(size)} is not a positive integer", "the file size in bytes")
        size = None
    secret = raw.get("secret")
    if secret is not None and (not isinstance(secret, str) or not SECRET_RE.fullmatch(secret)):
        problems.add(where, "secret", f"{_show(secret)} is not a secret name",
                     "an upper-case name such as HF_TOKEN or CIVITAI_TOKEN (the value is supplied at build time)")
        secret = None
    optional = raw.get("optional", False)
    if not isinstance(optional, bool):
        problems.add(where, "optional", f"{_show(optional)} is not a boolean", "true or false")
        optional = False
    if optional and raw.get("secret") is None:
        problems.add(where, "optional", "optional: true needs a 'secret'",
                     "optional only lets an entry be skipped when its secret is not supplied")
    # A url/civitai entry without sha256 is refused by `fetch` (missing_hashes), not here: `lock` must be able to
    # read the manifest whose hashes it is about to fill.
    if len(problems.items) > before or source is None or folder is None:
        return None
    return ModelEntry(index=index, name=name, folder=folder, filename=filename, source=source, sha256=sha256,
                      size=size, secret=secret, optional=optional)


def _folder(value: Any, where: str, problems: _Problems, folders: tuple[str, ...]) -> str | None:
    if value in folders:
        return value
    problems.add(where, "folder", f"{_show(value)} is not a known model folder",
                 ", ".join(folders) + " (declare others in the top-level 'extra_folders' list)")
    return None


def _sha256(value: Any, where: str, problems: _Problems) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and SHA256_RE.fullmatch(value.strip()):
        return value.strip().lower()
    hint = " (quote it: YAML read it as a number)" if isinstance(value, (int, float)) else ""
    problems.add(where, "sha256", f"{_show(value)} is not a sha256{hint}", "64 hexadecimal digits")
    return None


def _source(raw: dict[str, Any], where: str, problems: _Problems) -> Source | None:
    present = [k for k in SOURCE_KEYS if k in raw]
    if len(present) != 1:
        what = "no source" if not present else f"several sources ({', '.join(present)})"
        problems.add(where, "hf/url/civitai", what, "exactly one of hf: {repo, file, revision}, url: <https URL>, "
                     "civitai: {version_id}")
        return None
    key = present[0]
    value = raw[key]
    if key == "hf":
        return _hf_source(value, where, problems)
    if key == "url":
        return _url_source(value, where, problems)
    return _civitai_source(value, where, problems)


def _hf_source(value: Any, where: str, problems: _Problems) -> HfSource | None:
    if not isinstance(value, dict):
        problems.add(where, "hf", f"{_show(value)} is not a mapping", "{repo: org/name, file: path, revision: main}")
        return None
    before = len(problems.items)
    for key in value:
        if key not in HF_KEYS:
            problems.add(where, f"hf.{key}", "unknown field", ", ".join(HF_KEYS))
    repo = value.get("repo")
    if not isinstance(repo, str) or not HF_REPO_RE.fullmatch(repo):
        problems.add(where, "hf.repo", f"{_show(repo)} is not a repository id", "org/name")
    file = value.get("file")
    if (why := _rel_path_problem(file)) is not None:
        problems.add(where, "hf.file", why, "the path of the file inside the repository")
    revision = value.get("revision", "main")
    if not isinstance(revision, str) or not revision.strip() or any(c.isspace() for c in revision):
        hint = " (quote it: YAML read it as a number)" if isinstance(revision, (int, float)) else ""
        problems.add(where, "hf.revision", f"{_show(revision)} is not a revision{hint}",
                     "a branch, a tag or a 40-hex commit (`fetch_models.py lock` pins it to a commit)")
    repo_type = value.get("type", "model")
    if repo_type not in HF_REPO_TYPES:
        problems.add(where, "hf.type", f"{_show(repo_type)} is not a repository type", ", ".join(HF_REPO_TYPES))
    if len(problems.items) > before:
        return None
    return HfSource(repo=repo, file=file, revision=revision, repo_type=repo_type)


def _url_source(value: Any, where: str, problems: _Problems) -> UrlSource | None:
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        problems.add(where, "url", f"{_show(value)} is not an http(s) URL", "https://host/path")
        return None
    if parts.username or parts.password:
        problems.add(where, "url", "the URL carries credentials (user:password@)",
                     "a URL without credentials; put the token in a secret and name it in 'secret'")
        return None
    leaky = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if TOKENISH_QUERY.fullmatch(k)]
    if leaky:
        problems.add(where, "url", f"the URL carries what looks like a credential in its query ({', '.join(leaky)}=...)",
                     "a URL without tokens; put the token in a secret and name it in 'secret' "
                     "(it is sent as an Authorization: Bearer header)")
        return None
    return UrlSource(url=value)


def _civitai_source(value: Any, where: str, problems: _Problems) -> CivitaiSource | None:
    if not isinstance(value, dict):
        problems.add(where, "civitai", f"{_show(value)} is not a mapping", "{version_id: <number>}")
        return None
    unknown = [k for k in value if k not in CIVITAI_KEYS]
    for key in unknown:
        problems.add(where, f"civitai.{key}", "unknown field", ", ".join(CIVITAI_KEYS))
    version_id = value.get("version_id")
    if isinstance(version_id, bool) or not isinstance(version_id, int) or version_id <= 0:
        problems.add(where, "civitai.version_id", f"{_show(version_id)} is not a model version id",
                     "a positive integer (the number in civitai.com/api/download/models/<id>)")
        return None
    return None if unknown else CivitaiSource(version_id=version_id)


def _check_unique(entries: list[ModelEntry | None], problems: _Problems) -> None:
    seen_names: dict[str, int] = {}
    seen_dest: dict[str, int] = {}
    for entry in entries:
        if entry is None:
            continue
        if entry.name in seen_names:
            problems.add(entry.label, "name", f"duplicates the name of entry {seen_names[entry.name]}", "unique names")
        seen_names.setdefault(entry.name, entry.index)
        if entry.destination in seen_dest:
            problems.add(entry.label, "filename", f"{entry.destination} is also the destination of entry "
                         f"{seen_dest[entry.destination]}", "one entry per destination file")
        seen_dest.setdefault(entry.destination, entry.index)


def missing_hashes(manifest: Manifest, entries: list[ModelEntry] | None = None) -> list[str]:
    """Problems for url and civitai entries without sha256 (required for them; `lock` can fill them).

    Kept out of :func:`parse_manifest` so that `lock` can read a manifest whose hashes it is about to fill;
    `fetch` calls it for every entry it is going to download.
    """
    chosen = manifest.entries if entries is None else entries
    return [
        f"{manifest.path}: {e.label}: field 'sha256': missing; required for {_kind(e.source)} sources; accepted: "
        "64 hexadecimal digits (`fetch_models.py lock` fills it from the source's published hash)"
        for e in chosen
        if e.sha256 is None and not isinstance(e.source, HfSource)
    ]


def _kind(source: Source) -> str:
    return {HfSource: "hf", UrlSource: "url", CivitaiSource: "civitai"}[type(source)]


# -------------------------------------------------------------------------------------------- custom_nodes.txt


@dataclass(frozen=True)
class NodePack:
    """One custom node pack: a git repository at a ref, plus extra pip requirements."""

    line: int
    url: str
    ref: str
    extras: tuple[str, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        """The directory under custom_nodes/ (the repository name, as ComfyUI-Manager names it)."""
        tail = re.split(r"[/:]", self.url.rstrip("/"))[-1]
        return tail[:-4] if tail.endswith(".git") else tail

    @property
    def pinned(self) -> bool:
        return COMMIT_RE.fullmatch(self.ref) is not None

    @property
    def label(self) -> str:
        return f"line {self.line} ({self.name})"


URL_PREFIXES = ("https://", "http://", "ssh://", "git://", "file://")
SCP_RE = re.compile(r"[\w.-]+@[\w.-]+:.+")
PIP_SPEC_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?([<>=!~]=?[^\s;]+(,[<>=!~]=?[^\s,;]+)*)?")


def load_node_list(path: Path | str, allow_unpinned: bool = False) -> list[NodePack]:
    """Read and validate a custom_nodes.txt; raise :class:`ManifestError` listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(str(path), [f"{path}: cannot read the file: {exc.strerror or exc}"]) from None
    return parse_node_list(text, path, allow_unpinned)


def parse_node_list(text: str, path: Path | str = "custom_nodes.txt", allow_unpinned: bool = False) -> list[NodePack]:
    """One pack per line: ``<git URL>@<40-hex commit> [pip requirement ...]``; ``#`` starts a comment."""
    problems = _Problems(str(path))
    packs: list[NodePack] = []
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw_line).strip()
        if not line:
            continue
        pack = _node_line(number, line, problems, allow_unpinned)
        if pack is not None:
            packs.append(pack)
    seen: dict[str, int] = {}
    for pack in packs:
        if pack.name in seen:
            problems.add(pack.label, "url", f"installs into custom_nodes/{pack.name}, like line {seen[pack.name]}",
                         "one line per node pack")
        seen.setdefault(pack.name, pack.line)
    problems.raise_if_any()
    return packs


def _node_line(number: int, line: str, problems: _Problems, allow_unpinned: bool) -> NodePack | None:
    first, *extras = line.split()
    url, sep, ref = first.rpartition("@")
    where = f"line {number}"
    if not sep or not url or "/" in ref or ":" in ref:
        problems.add(where, "url", f"{_show(first)} has no '@<commit>'", "<git URL>@<40-hex commit>")
        return None
    if not (url.startswith(URL_PREFIXES) or SCP_RE.fullmatch(url) or url.startswith("/")):
        problems.add(where, "url", f"{_show(url)} is not a git URL",
                     "https://, http://, ssh://, git://, file:// URLs, user@host:path or an absolute path")
        return None
    pack = NodePack(line=number, url=url, ref=ref, extras=tuple(extras))
    where = pack.label
    ok = True
    if not pack.pinned and not allow_unpinned:
        looks = "an abbreviated commit" if re.fullmatch(r"[0-9a-fA-F]{4,39}", ref) else "a branch or tag"
        problems.add(where, "commit", f"{_show(ref)} is {looks}, not a pinned commit",
                     "a full 40-hex commit id (set ALLOW_UNPINNED=true to allow branches and tags)")
        ok = False
    for extra in extras:
        if not PIP_SPEC_RE.fullmatch(extra):
            problems.add(where, "extras", f"{_show(extra)} is not a pip requirement",
                         "requirement specifiers such as insightface==0.7.3 or onnxruntime>=1.17 (no pip options)")
            ok = False
    return pack if ok else None


# ------------------------------------------------------------------------------------------ editing (for `lock`)


def edit_manifest_text(text: str, manifest: Manifest, changes: dict[int, dict[str, Any]]) -> str:
    """Set fields of entries in the manifest text, keeping its comments and layout.

    ``changes`` maps an entry's 1-based index to ``{field: value}`` where field is ``sha256``, ``size`` or
    ``hf.revision``. PyYAML cannot round-trip comments, so the edit works on the text at the positions PyYAML
    reports; the result is parsed again and must say exactly what was asked, or nothing is written.
    """
    root = _yaml().compose(text)
    models = next(v for k, v in root.value if k.value == "models")
    edits: list[tuple[int, int, str, int]] = []
    for index, change in changes.items():
        item = models.value[index - 1]
        for dotted, value in change.items():
            node = item
            key = dotted
            if dotted.startswith("hf."):
                node, key = _child(item, "hf"), dotted[3:]
            edits.append((*_set_key(text, node, key, value), len(edits)))
    # From the end backwards, so earlier positions stay valid; at one position the first-listed field ends first.
    for start, end, replacement, _ in sorted(edits, key=lambda e: (e[0], e[3]), reverse=True):
        text = text[:start] + replacement + text[end:]
    _verify_edit(text, manifest, changes)
    return text


def _child(mapping: Any, key: str) -> Any:
    return next(v for k, v in mapping.value if k.value == key)


def _render(value: Any) -> str:
    """A scalar as YAML text that reads back as the same value (a digits-only hash must be quoted)."""
    plain = str(value)
    return plain if _yaml().safe_load(plain) == value else '"' + plain + '"'


def _set_key(text: str, mapping: Any, key: str, value: Any) -> tuple[int, int, str]:
    rendered = _render(value)
    for k, v in mapping.value:
        if k.value == key:  # replace the value in place; note what a block-style pin replaced
            start, end = v.start_mark.index, v.end_mark.index
            line_end = text.find("\n", end)
            rest = text[end: len(text) if line_end < 0 else line_end]
            note = f"  # was {v.value}" if not mapping.flow_style and not rest.strip() and key == "revision" else ""
            return start, end, rendered + note
    if mapping.flow_style:
        close = mapping.end_mark.index - 1
        if text[close] != "}":
            raise ValueError(f"cannot find the end of the mapping at line {mapping.end_mark.line + 1}")
        sep = ", " if mapping.value else ""
        return close, close, f"{sep}{key}: {rendered}"
    anchors = [(k, v) for k, v in mapping.value
               if isinstance(v, _yaml().ScalarNode) and v.start_mark.line == v.end_mark.line and v.style not in ("|", ">")]
    if not anchors:
        raise ValueError(f"cannot place '{key}' in the mapping at line {mapping.start_mark.line + 1}; add it by hand")
    k, v = anchors[-1]
    line_end = text.find("\n", v.end_mark.index)
    at = len(text) if line_end < 0 else line_end
    return at, at, "\n" + " " * k.start_mark.column + f"{key}: {rendered}"


def _verify_edit(text: str, before: Manifest, changes: dict[int, dict[str, Any]]) -> None:
    after = parse_manifest(text, before.path)
    by_index = {e.index: e for e in after.entries}
    for index, change in changes.items():
        entry = by_index.get(index)
        for dotted, value in change.items():
            got = getattr(entry.source, dotted[3:], None) if dotted.startswith("hf.") else getattr(entry, dotted, None)
            if entry is None or got != value:
                raise ValueError(f"editing entry {index} field {dotted} did not give {value!r}; file left unchanged")
