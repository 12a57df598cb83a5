"""Checking a workflow against what this ComfyUI has, before it is queued, and explaining ComfyUI's refusals.

ComfyUI's own validation answers a bad prompt with a 400 whose ``error.details`` is usually empty and whose
useful part, ``node_errors``, is a nest of codes. Users of every existing worker get "Prompt outputs failed
validation" and nothing else, or a missing checkpoint without the list of installed ones. Here:

* :class:`NodeCatalog` wraps ``GET /object_info`` (fetched once, refreshed after a restart or when a name is
  not found -- see :class:`~supervisor.jobs.engine.JobEngine`);
* :func:`preflight` finds unknown node classes, models that are not installed (listing the installed ones),
  ``LoadImage`` inputs naming images that were neither supplied nor present, and inputs a node does not
  have (warnings: ComfyUI silently ignores them, which hides mistakes like seed 003's
  ``stop_at_clip_layer`` on ``CheckpointLoaderSimple``);
* :func:`render_prompt_error` turns a 400 body into one line per problem, in the same words.

Every line starts ``node <id> (<class>)`` so a user can find it in their graph.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from supervisor.jobs.inputs import JOB_FOLDER_PREFIX, ComfyDirs

MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft", ".gguf", ".onnx")
UPLOAD_FLAGS = ("image_upload",)
MAX_LISTED = 25
FILE_TYPE_SUFFIXES = {" [input]": "input", " [output]": "output", " [temp]": "temp"}
JOB_FILES = {"output": "outputs", "temp": "previews"}


class NodeCatalog:
    """ComfyUI's ``/object_info``: which node classes exist, their inputs, and each combo's options."""

    def __init__(self, info: Mapping[str, Any], generation: int | None = None) -> None:
        self.info = info
        self.generation = generation
        self._by_input: dict[str, list[str]] | None = None

    def has(self, class_type: str) -> bool:
        return class_type in self.info

    def class_names(self) -> list[str]:
        return list(self.info)

    def _inputs(self, class_type: str) -> Mapping[str, Any]:
        entry = self.info.get(class_type)
        inputs = entry.get("input") if isinstance(entry, Mapping) else None
        return inputs if isinstance(inputs, Mapping) else {}

    def input_config(self, class_type: str, name: str) -> list[Any] | None:
        """``[TYPE, {opts}]`` for a required or optional input, None if the class has no such input."""
        for section in ("required", "optional"):
            group = self._inputs(class_type).get(section)
            if isinstance(group, Mapping) and name in group:
                config = group[name]
                return list(config) if isinstance(config, (list, tuple)) else [config]
        return None

    def input_position(self, class_type: str, name: str) -> int:
        """Where an input is declared (required, then optional, then hidden); unknown inputs come last."""
        position = 0
        for section in ("required", "optional", "hidden"):
            group = self._inputs(class_type).get(section)
            for declared in group if isinstance(group, Mapping) else ():
                if declared == name:
                    return position
                position += 1
        return position

    def input_names(self, class_type: str) -> set[str]:
        names: set[str] = set()
        for section in ("required", "optional", "hidden"):
            group = self._inputs(class_type).get(section)
            if isinstance(group, Mapping):
                names.update(group)
        return names

    def combo_options(self, class_type: str, name: str) -> list[str] | None:
        """The accepted values of a combo input (V1 ``[[...]]`` or V3 ``["COMBO", {"options": [...]}]``)."""
        config = self.input_config(class_type, name)
        if not config:
            return None
        if isinstance(config[0], list):
            return [str(v) for v in config[0]]
        if config[0] == "COMBO" and len(config) > 1 and isinstance(config[1], Mapping):
            options = config[1].get("options")
            if isinstance(options, list):
                return [str(v) for v in options]
        return None

    def input_type(self, class_type: str, name: str) -> str | None:
        config = self.input_config(class_type, name)
        if not config:
            return None
        return "COMBO" if isinstance(config[0], list) else str(config[0])

    def is_upload_input(self, class_type: str, name: str) -> bool:
        """An input that names a file in ComfyUI's input folder (``LoadImage.image`` and its kind)."""
        config = self.input_config(class_type, name)
        if not config or len(config) < 2 or not isinstance(config[1], Mapping):
            return False
        return any(config[1].get(flag) for flag in UPLOAD_FLAGS)

    def is_output_node(self, class_type: str) -> bool:
        entry = self.info.get(class_type)
        return bool(isinstance(entry, Mapping) and entry.get("output_node"))

    def classes_with_input(self, name: str) -> list[str]:
        """Which classes declare an input of this name (to say where a misplaced input belongs)."""
        if self._by_input is None:
            index: dict[str, list[str]] = {}
            for class_type in self.info:
                for input_name in self.input_names(class_type):
                    index.setdefault(input_name, []).append(class_type)
            self._by_input = index
        return self._by_input.get(name, [])


@dataclass
class PreflightReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    missing_names: bool = False  # a class or model was not found: worth refreshing the catalogue once

    @property
    def ok(self) -> bool:
        return not self.problems


def node_label(node_id: str, graph: Mapping[str, Any]) -> str:
    """``node 30 (CheckpointLoaderSimple)``: how every line names a node."""
    node = graph.get(node_id)
    class_type = node.get("class_type") if isinstance(node, Mapping) else None
    return f"node {node_id} ({class_type})" if class_type else f"node {node_id}"


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def looks_like_model(value: str) -> bool:
    return value.lower().endswith(MODEL_EXTENSIONS)


def output_ancestors(graph: Mapping[str, Mapping[str, Any]], catalog: NodeCatalog) -> set[str]:
    """The output nodes and every node feeding them: what ComfyUI validates and runs."""
    todo = [nid for nid, node in graph.items() if catalog.is_output_node(node["class_type"])]
    seen: set[str] = set()
    while todo:
        nid = todo.pop()
        if nid in seen or nid not in graph:
            continue
        seen.add(nid)
        todo.extend(v[0] for v in graph[nid]["inputs"].values() if is_link(v))
    return seen


def preflight(
    graph: Mapping[str, Mapping[str, Any]],
    catalog: NodeCatalog,
    *,
    supplied: Sequence[str] = (),
    inline: Iterable[tuple[str, str]] = (),
    dirs: ComfyDirs | None = None,
    import_failures: Sequence[str] = (),
) -> PreflightReport:
    """Every problem that would make ComfyUI refuse or mis-run the graph, found without queueing it."""
    report = PreflightReport()
    _check_classes(graph, catalog, report, import_failures)
    if report.problems:
        return report  # without the classes, inputs cannot be judged
    if not any(catalog.is_output_node(node["class_type"]) for node in graph.values()):
        report.problems.append(
            "the workflow has no output node (such as SaveImage or PreviewImage), so ComfyUI has nothing to run"
        )
        return report
    reached = output_ancestors(graph, catalog)
    inline_keys = set(inline)
    for node_id in graph:
        if node_id not in reached:
            continue
        _check_models(node_id, graph, catalog, report)
        if dirs is not None:
            _check_input_files(node_id, graph, catalog, report, supplied, inline_keys, dirs)
    for node_id in graph:
        _warn_unknown_inputs(node_id, graph, catalog, report)
    return report


def _check_classes(
    graph: Mapping[str, Mapping[str, Any]], catalog: NodeCatalog, report: PreflightReport, import_failures: Sequence[str]
) -> None:
    for node_id, node in graph.items():
        class_type = node["class_type"]
        if catalog.has(class_type):
            continue
        report.missing_names = True
        line = f"node {node_id}: class_type '{class_type}' is not installed in this ComfyUI (no loaded node pack provides it)"
        close = difflib.get_close_matches(class_type, catalog.class_names(), n=1, cutoff=0.8)
        if close:
            line += f"; did you mean '{close[0]}'?"
        elif import_failures:
            line += "; node packs that failed to import: " + ", ".join(import_failures)
        report.problems.append(line)


def _check_models(node_id: str, graph: Mapping[str, Mapping[str, Any]], catalog: NodeCatalog, report: PreflightReport) -> None:
    node = graph[node_id]
    for name, value in node["inputs"].items():
        if not isinstance(value, str) or not looks_like_model(value):
            continue
        options = catalog.combo_options(node["class_type"], name)
        if options is None or value in options or value.replace("\\", "/") in options:
            continue
        report.missing_names = True
        report.problems.append(f"{node_label(node_id, graph)} input {name}: {not_installed(value, options)}")


def not_installed(value: str, options: Sequence[str]) -> str:
    """``'x.safetensors' is not installed; installed: a.safetensors, b.safetensors``.

    Only files count as installed: a loader's built-in choices (VAELoader's ``pixel_space``, the TAESD pairs)
    are named apart, so nobody looks for a file called ``pixel_space``.
    """
    installed = [o for o in options if looks_like_model(o)]
    built_in = [o for o in options if not looks_like_model(o)]
    line = f"'{value}' is not installed; installed: {_listing(installed)}"
    return line + (f" (built-in options, not files: {_listing(built_in)})" if built_in else "")


def _listing(options: Sequence[str]) -> str:
    if not options:
        return "none"
    shown = ", ".join(options[:MAX_LISTED])
    if len(options) > MAX_LISTED:
        shown += f" and {len(options) - MAX_LISTED} more"
    return shown


def _check_input_files(
    node_id: str,
    graph: Mapping[str, Mapping[str, Any]],
    catalog: NodeCatalog,
    report: PreflightReport,
    supplied: Sequence[str],
    inline_keys: set[tuple[str, str]],
    dirs: ComfyDirs,
) -> None:
    node = graph[node_id]
    for name, value in node["inputs"].items():
        if not isinstance(value, str) or (node_id, name) in inline_keys or value in supplied:
            continue
        if not catalog.is_upload_input(node["class_type"], name):
            continue
        private = other_jobs_file(value)
        if private:
            report.problems.append(
                f"{node_label(node_id, graph)} input {name}: '{_cut(value)}' names {private}; a job can load only "
                "the images it supplies and the files installed in ComfyUI's input folder"
            )
            continue
        if input_file_exists(value, dirs):
            continue
        given = ("supplied: " + ", ".join(supplied)) if supplied else 'no images were supplied (send them as "images": [{"name", "image"}])'
        report.problems.append(
            f"{node_label(node_id, graph)} input {name}: '{_cut(value)}' was not supplied and is not in "
            f"ComfyUI's input folder; {given}"
        )


def other_jobs_file(value: str) -> str | None:
    """What a file name reaches that belongs to jobs, not to the installation; None when it is not such a name.

    ComfyUI's output and temp folders hold only jobs' results and previews, and every ``job-...`` folder of its
    input folder one job's uploads: all of them are private to the job that made them (they are deleted when it
    ends, but a job that runs meanwhile must not read them either).
    """
    for suffix, folder in FILE_TYPE_SUFFIXES.items():
        if value.endswith(suffix) and folder != "input":
            return f"a file in ComfyUI's {folder} folder, where only jobs' own {JOB_FILES[folder]} are"
    first = value.removesuffix(" [input]").replace("\\", "/").lstrip("/").split("/", 1)[0]
    if first.startswith(JOB_FOLDER_PREFIX):
        return f"another job's upload folder ({first})"
    return None


def input_file_exists(value: str, dirs: ComfyDirs) -> bool:
    """Whether ``LoadImage`` would find this name: ``sub/name.png``, optionally with `` [input|output|temp]``."""
    kind = "input"
    for suffix, folder in FILE_TYPE_SUFFIXES.items():
        if value.endswith(suffix):
            value, kind = value[: -len(suffix)], folder
            break
    root = dirs.for_type(kind)
    if root is None or not value or "\x00" in value:
        return False
    try:
        base = root.resolve()
        path = (base / value).resolve()
    except (OSError, ValueError):
        return False
    return path.is_relative_to(base) and path.is_file()


def _warn_unknown_inputs(
    node_id: str, graph: Mapping[str, Mapping[str, Any]], catalog: NodeCatalog, report: PreflightReport
) -> None:
    """Inputs the class does not declare: ComfyUI drops them without a word, so we say it.

    Object values are left alone: nodes with dynamic inputs (rgthree's LoRA stacks...) declare a catch-all
    that ``/object_info`` cannot show, and they take objects.
    """
    node = graph[node_id]
    class_type = node["class_type"]
    known = catalog.input_names(class_type)
    if not known:
        return
    for name, value in node["inputs"].items():
        if name in known or isinstance(value, dict):
            continue
        line = f"{node_label(node_id, graph)} input {name}: {class_type} has no such input, so ComfyUI ignores it"
        # the classes this input belongs to, those sharing most of the node's inputs first (the one meant)
        given = set(node["inputs"])
        owners = sorted((c for c in catalog.classes_with_input(name) if c != class_type),
                        key=lambda c: (-len(given & catalog.input_names(c)), c))
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        if close:
            line += f"; did you mean '{close[0]}'?"
        elif owners:
            shown = ", ".join(owners[:3]) + (" and others" if len(owners) > 3 else "")
            line += f"; it is an input of {shown}"
        report.warnings.append(line)


# --- ComfyUI's 400 bodies ------------------------------------------------------------------------------


def render_prompt_error(body: Any, graph: Mapping[str, Any], catalog: NodeCatalog | None) -> list[str]:
    """One line per problem of a ``POST /prompt`` 400 body, from ``node_errors`` (never ``error.details``)."""
    if not isinstance(body, Mapping):
        return [f"ComfyUI refused the prompt: {_cut(str(body), 300)}"]
    lines = render_node_errors(body.get("node_errors"), graph, catalog)
    if lines:
        return lines
    error = body.get("error")
    if not isinstance(error, Mapping):
        return [f"ComfyUI refused the prompt: {_cut(str(error or body), 300)}"]
    etype, message = error.get("type"), str(error.get("message") or "").strip()
    if etype == "prompt_no_outputs":
        return ["the workflow has no output node (such as SaveImage or PreviewImage), so ComfyUI has nothing to run"]
    if etype == "invalid_prompt":
        details = str(error.get("details") or "")
        where = details.replace("Node ID '#", "node ").rstrip("'") if details.startswith("Node ID") else ""
        missing = re.fullmatch(r"Cannot execute because node (.+) does not exist\.", message)
        if missing and where:
            return [f"{where}: class_type '{missing[1]}' is not installed in this ComfyUI (no loaded node pack "
                    "provides it)"]
        if "missing the class_type" in message and where:
            return [f"{where} has no class_type (the node's type, e.g. \"KSampler\")"]
        return [f"{where}: {message}" if where else message]
    return [message or f"ComfyUI refused the prompt ({etype})"]


def render_node_errors(node_errors: Any, graph: Mapping[str, Any], catalog: NodeCatalog | None) -> list[str]:
    lines: list[str] = []
    if not isinstance(node_errors, Mapping):
        return lines
    for node_id, entry in node_errors.items():
        if not isinstance(entry, Mapping):
            continue
        label = node_label(str(node_id), graph)
        if str(node_id) not in graph and entry.get("class_type"):
            label = f"node {node_id} ({entry['class_type']})"
        class_type = str(entry.get("class_type") or (graph.get(str(node_id)) or {}).get("class_type") or "")
        errors = [err for err in entry.get("errors") or [] if isinstance(err, Mapping)]
        if catalog is not None:  # ComfyUI lists one node's errors in set order: a different order every start
            errors.sort(key=lambda err: catalog.input_position(class_type, str(_input_name(err))))
        lines += [_render_one(label, class_type, err, catalog) for err in errors]
    return lines


def _input_name(err: Mapping[str, Any]) -> Any:
    extra = err.get("extra_info")
    return extra.get("input_name") if isinstance(extra, Mapping) else None


def _render_one(label: str, class_type: str, err: Mapping[str, Any], catalog: NodeCatalog | None) -> str:
    etype = err.get("type")
    message = str(err.get("message") or "").strip()
    details = str(err.get("details") or "").strip()
    extra = err.get("extra_info") if isinstance(err.get("extra_info"), Mapping) else {}
    input_name = extra.get("input_name")
    where = f"{label} input {input_name}" if input_name else label
    if etype == "required_input_missing":
        return f"{where}: required input is missing"
    if etype == "value_not_in_list":
        received = extra.get("received_value")
        options = catalog.combo_options(class_type, str(input_name)) if catalog and input_name else None
        if options is None:
            config = extra.get("input_config")
            if isinstance(config, list) and config and isinstance(config[0], list):
                options = [str(o) for o in config[0]]
        if options is not None and isinstance(received, str):
            if looks_like_model(received):
                return f"{where}: {not_installed(received, options)}"
            return f"{where}: {bad_option(received, options)}"
        return f"{where}: {details or message}"
    if etype == "return_type_mismatch":
        linked = extra.get("linked_node")
        source = f" from node {linked[0]} output {linked[1]}" if isinstance(linked, list) and len(linked) == 2 else ""
        config = extra.get("input_config")
        wanted = config[0] if isinstance(config, list) and config else "?"
        return f"{where}: receives {extra.get('received_type', '?')}{source} but needs {wanted}"
    if etype == "custom_validation_failed" and input_name and details.startswith(f"{input_name} - "):
        return f"{where}: {details[len(input_name) + 3:]}"
    if etype == "invalid_input_type" and "received_value" in extra:
        return f"{where}: {message} (received {_cut(repr(extra['received_value']))})"
    if etype in ("exception_during_validation", "exception_during_inner_validation"):
        exc_type = extra.get("exception_type", "Exception")
        return f"{where}: {message}: {exc_type} {details}".rstrip()
    if details and details != input_name and details not in message:
        return f"{where}: {message}: {details}"
    return f"{where}: {message}"


def bad_option(received: str, options: Sequence[str]) -> str:
    """``'Average' is not an accepted value (did you mean 'average'?); accepted: concat, add, ...``."""
    line = f"'{_cut(received)}' is not an accepted value"
    folded = [o for o in options if o.lower() == received.lower()]
    close = folded or difflib.get_close_matches(received, list(options), n=1, cutoff=0.75)
    if close:
        line += f" (did you mean '{close[0]}'?)"
    return line + f"; accepted: {_listing(list(options))}"


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
