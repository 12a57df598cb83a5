"""Named workflows: API-format graphs baked into ``WORKFLOWS_DIR``, run by name with a few typed parameters.

A client sends ``{"workflow": "sdxl_txt2img", "inputs": {"prompt": "a red fox", "seed": 7}}`` instead of a
whole graph. Each ``*.json`` file in ``WORKFLOWS_DIR`` is one workflow; its name is the file name without
``.json``. The file::

    {
      "description": "SDXL text to image",
      "aliases": ["txt2img"],                      # other names it answers to (e.g. a deployment id)
      "parameters": {
        "prompt": {"node": "6", "input": "text", "description": "what to draw"},
        "seed":   {"node": "3", "input": "seed", "min": 0},
        "face":   {"node": "12", "input": "image", "type": "image", "required": true}
      },
      "workflow": { ...the API-format graph (Workflow > Export (API))... }
    }

A parameter names one literal input of one node. Its ``type`` (``string``, ``int``, ``float``, ``bool``,
``image``) defaults to the type of the value already in the graph, which is also its default (a parameter
whose node input holds no value must declare ``type`` and is then required unless it has a ``default``).
``choices``, ``min`` and ``max`` restrict values. An ``image`` takes base64, a data URI, an http(s) URL or the
name of a file in ComfyUI's input folder.

ComfyUI Deploy's record form is read too (seed 004): ``{"deployment_id", "name", "inputs": {name:
{"node_id", "input_name"}}, "workflow_api": graph}``; ``deployment_id`` and ``name`` become aliases.

Everything else in the request (``timeout_s``, ``response_format``, ``image_format``, ...) passes through to
the job engine unchanged. Mistakes are :class:`~supervisor.errors.InvalidInputError` s that list what exists.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.errors import INVALID_PREFIX, InvalidInputError
from supervisor.jobs.image_checks import classify_source
from supervisor.jobs.request import json_type_name

log = logging.getLogger("supervisor.workflows")

TYPES = ("string", "int", "float", "bool", "image")
IMAGE_NODE_INPUTS = frozenset({("LoadImage", "image"), ("LoadImageMask", "image")})


class WorkflowFileError(ValueError):
    """A workflow file that cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class Parameter:
    name: str
    node_id: str
    input_name: str
    type: str
    default: Any = None
    required: bool = False
    description: str = ""
    choices: tuple[Any, ...] = ()
    min: float | None = None
    max: float | None = None

    def describe(self) -> str:
        """``seed (int, default 42)`` -- for lists of what exists."""
        extra = [self.type]
        if self.required:
            extra.append("required")
        elif self.default is not None and self.type != "image":
            extra.append(f"default {_short(self.default)}")
        return f"{self.name} ({', '.join(extra)})"

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"node": self.node_id, "input": self.input_name, "type": self.type,
                                "required": self.required}
        if self.default is not None and self.type != "image":
            body["default"] = self.default
        if self.description:
            body["description"] = self.description
        if self.choices:
            body["choices"] = list(self.choices)
        if self.min is not None:
            body["min"] = self.min
        if self.max is not None:
            body["max"] = self.max
        return body

    def check(self, value: Any) -> str | None:
        """The problem with ``value`` for this parameter, or None."""
        kind = self.type
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                return f"must be an integer; got {_short(value)}"
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"must be a number; got {_short(value)}"
        elif kind == "bool":
            if not isinstance(value, bool):
                return f"must be true or false; got {_short(value)}"
        elif kind in ("string", "image"):
            if not isinstance(value, str):
                return f"must be a string; got {_short(value)}"
            if kind == "image" and not value.strip():
                return "must be an image (base64, a data URI, an http(s) URL or an input file name); got ''"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(_short(c) for c in self.choices)}; got {_short(value)}"
        if kind in ("int", "float"):
            if self.min is not None and value < self.min:
                return f"must be at least {self.min:g}; got {value}"
            if self.max is not None and value > self.max:
                return f"must be at most {self.max:g}; got {value}"
        return None


@dataclass(frozen=True)
class NamedWorkflow:
    name: str
    graph: dict[str, Any]
    parameters: dict[str, Parameter]
    description: str = ""
    aliases: tuple[str, ...] = ()
    path: Path | None = None

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "aliases": list(self.aliases),
                "parameters": {p.name: p.to_dict() for p in self.parameters.values()}}

    def parameter_list(self) -> str:
        return ", ".join(p.describe() for p in self.parameters.values()) or "none"

    def build(self, inputs: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """The graph with ``inputs`` applied, and the ``images`` entries they need; InvalidInputError if wrong."""
        where = f"workflow '{self.name}'"
        if inputs is None:
            inputs = {}
        if not isinstance(inputs, Mapping):
            raise InvalidInputError(
                f"{INVALID_PREFIX}: {where}: 'inputs' must be an object of parameter values; got {json_type_name(inputs)} "
                f"(parameters: {self.parameter_list()})"
            )
        problems: list[str] = []
        for key in inputs:
            if key not in self.parameters:
                problems.append(f"{where} has no parameter '{key}' (parameters: {self.parameter_list()})")
        for param in self.parameters.values():
            if param.name in inputs:
                problem = param.check(inputs[param.name])
                if problem:
                    problems.append(f"{where} parameter '{param.name}' {problem}")
            elif param.required:
                problems.append(f"{where} needs parameter '{param.name}' ({param.describe()})")
        if problems:
            raise InvalidInputError.with_problems(INVALID_PREFIX, problems)
        graph = copy.deepcopy(self.graph)
        images: list[dict[str, str]] = []
        for param in self.parameters.values():
            if param.name not in inputs:
                continue
            value = inputs[param.name]
            if param.type == "image" and classify_source(value, inline=True) is not None:
                name = f"{param.name}{_image_extension(value)}"
                images.append({"name": name, "image": value})
                value = name
            graph[param.node_id]["inputs"][param.input_name] = value
        return graph, images


def is_named_request(raw: Any) -> bool:
    """``{"workflow": "<name>", ...}``: a name, not a graph (a graph given as a JSON string starts with '{')."""
    if not isinstance(raw, Mapping):
        return False
    value = raw.get("workflow")
    return isinstance(value, str) and not value.lstrip().startswith("{")


class WorkflowLibrary:
    """The named workflows of one directory, loaded once at start-up."""

    def __init__(self, workflows: Mapping[str, NamedWorkflow], broken: Mapping[str, str] | None = None,
                 directory: Path | None = None) -> None:
        self.workflows = dict(workflows)
        self.broken = dict(broken or {})  # name -> why its file could not be used
        self.directory = directory
        self._by_alias: dict[str, NamedWorkflow] = {}
        for wf in self.workflows.values():
            for alias in wf.aliases:
                if alias not in self.workflows:
                    self._by_alias.setdefault(alias, wf)

    @classmethod
    def load(cls, directory: Path) -> "WorkflowLibrary":
        workflows: dict[str, NamedWorkflow] = {}
        broken: dict[str, str] = {}
        if directory.is_dir():
            for path in sorted(directory.glob("*.json")):
                try:
                    wf = load_workflow(path)
                except WorkflowFileError as exc:
                    log.warning("named workflow %s cannot be used: %s", path.name, exc)
                    broken[path.stem] = str(exc)
                    continue
                workflows[wf.name] = wf
        return cls(workflows, broken, directory)

    def names(self) -> list[str]:
        return sorted(self.workflows)

    def find(self, name: str) -> NamedWorkflow | None:
        return self.workflows.get(name) or self._by_alias.get(name)

    def get(self, name: str) -> NamedWorkflow:
        wf = self.find(name)
        if wf is not None:
            return wf
        if name in self.broken:
            raise InvalidInputError(f"{INVALID_PREFIX}: workflow '{name}' cannot be used: {self.broken[name]}")
        available = ", ".join(self.names()) or "none (WORKFLOWS_DIR holds no usable workflow)"
        raise InvalidInputError(f"{INVALID_PREFIX}: no workflow named '{_clip(name)}'; available: {available}")

    def expand(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """``{"workflow": name, "inputs": {...}, **options}`` -> ``{"workflow": graph, "images": [...], **options}``."""
        wf = self.get(str(raw["workflow"]).strip())
        graph, images = wf.build(raw.get("inputs"))
        request = {k: v for k, v in raw.items() if k not in ("workflow", "inputs")}
        request["workflow"] = graph
        if images:
            extra = request.get("images")
            request["images"] = (list(extra) if isinstance(extra, list) else []) + images
        return request


def prepare_input(raw: Any, library: WorkflowLibrary) -> Any:
    """The job input the engine gets: a named-workflow request expanded, anything else unchanged."""
    if is_named_request(raw):
        return library.expand(raw)
    return raw


# --- loading -------------------------------------------------------------------------------------------


def load_workflow(path: Path) -> NamedWorkflow:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkflowFileError(f"cannot be read as JSON ({exc})") from None
    return parse_workflow(path.stem, document, path)


def parse_workflow(name: str, document: Any, path: Path | None = None) -> NamedWorkflow:
    if not isinstance(document, Mapping):
        raise WorkflowFileError("must be a JSON object")
    graph = document.get("workflow", document.get("workflow_api"))
    if graph is None and document and all(isinstance(n, Mapping) and "class_type" in n for n in document.values()):
        graph = document  # a bare API graph: a workflow without parameters
    if not isinstance(graph, Mapping) or not graph or not all(
        isinstance(n, Mapping) and isinstance(n.get("class_type"), str) for n in graph.values()
    ):
        raise WorkflowFileError("holds no API-format graph under 'workflow' (export it with Workflow > Export (API))")
    graph = {str(k): {**v, "inputs": dict(v.get("inputs") or {})} for k, v in graph.items()}
    specs = document.get("parameters", document.get("inputs", {})) if graph is not document else {}
    if not isinstance(specs, Mapping):
        raise WorkflowFileError("'parameters' must be an object of name -> {node, input}")
    parameters = {str(pname): _parse_parameter(str(pname), spec, graph) for pname, spec in specs.items()}
    aliases = [a for a in document.get("aliases", []) if isinstance(a, str)] if graph is not document else []
    for key in ("deployment_id", "name"):
        value = document.get(key) if graph is not document else None
        if isinstance(value, str) and value and value != name:
            aliases.append(value)
    description = document.get("description", "") if graph is not document else ""
    return NamedWorkflow(name=name, graph=graph, parameters=parameters, description=str(description or ""),
                         aliases=tuple(dict.fromkeys(aliases)), path=path)


def _parse_parameter(name: str, spec: Any, graph: Mapping[str, Any]) -> Parameter:
    where = f"parameter '{name}'"
    if not isinstance(spec, Mapping):
        raise WorkflowFileError(f"{where} must be an object {{\"node\", \"input\"}}")
    node_id = spec.get("node", spec.get("node_id"))
    input_name = spec.get("input", spec.get("input_name"))
    if node_id is None or not isinstance(input_name, str) or not input_name:
        raise WorkflowFileError(f"{where} needs 'node' (a node id) and 'input' (an input name)")
    node_id = str(node_id)
    node = graph.get(node_id)
    if node is None:
        raise WorkflowFileError(f"{where} names node {node_id}, which is not in the workflow")
    present = input_name in node["inputs"]
    current = node["inputs"].get(input_name)
    if isinstance(current, list):
        raise WorkflowFileError(f"{where} names node {node_id} input '{input_name}', which is a link, not a value")
    declared = spec.get("type")
    if declared is not None and declared not in TYPES:
        raise WorkflowFileError(f"{where} has type {declared!r}; accepted: {', '.join(TYPES)}")
    kind = declared or _type_of(current, node.get("class_type"), input_name)
    if kind is None:
        raise WorkflowFileError(
            f"{where}: node {node_id} has no value for '{input_name}' to take the type from; declare 'type'"
        )
    default = spec.get("default", current if present else None)
    required = bool(spec.get("required", default is None))
    choices = spec.get("choices") or ()
    if not isinstance(choices, (list, tuple)):
        raise WorkflowFileError(f"{where}: 'choices' must be a list")
    bounds = {}
    for key in ("min", "max"):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise WorkflowFileError(f"{where}: '{key}' must be a number")
        bounds[key] = value
    return Parameter(name=name, node_id=node_id, input_name=input_name, type=kind, default=default,
                     required=required, description=str(spec.get("description", "")), choices=tuple(choices),
                     min=bounds["min"], max=bounds["max"])


def _type_of(value: Any, class_type: Any, input_name: str) -> str | None:
    if (class_type, input_name) in IMAGE_NODE_INPUTS:
        return "image"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return None


def _image_extension(value: str) -> str:
    head = value.lstrip()[:40].lower()
    for marker, ext in (("image/jpeg", ".jpg"), ("image/jpg", ".jpg"), ("image/webp", ".webp"),
                        ("image/gif", ".gif"), ("image/bmp", ".bmp"), ("image/tiff", ".tiff")):
        if head.startswith("data:" + marker):
            return ext
    if head.startswith("/9j/"):
        return ".jpg"
    if head.startswith("uklgr"):
        return ".webp"
    return ".png"


def _short(value: Any, limit: int = 40) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
