"""The job request: every form our users send, parsed into one :class:`JobRequest` or one clear error.

Forms accepted (see docs/jobs.md):

* ``{"workflow": {graph}, "images": [{"name", "image"}], ...options}`` -- the official worker's form
  (seeds 000, 001, 003); ``prompt`` is accepted as another name for ``workflow`` (ComfyUI's own body);
  the graph may also be given as a JSON string;
* the graph itself as the whole input (seed 002): recognised when every value is an object with a
  ``class_type``; that form has no options;
* inline images in a node input named ``image`` (seed 002's ``LoadImage``): a data URI, an http(s) URL, or a
  string that decodes as strict base64 to a real image. They are recorded here and resolved by
  :mod:`supervisor.jobs.inputs`; any other string is a file name;
* a UI-format workflow (``nodes``/``links``) is refused with a message telling the user to export with
  "Export (API)".

Parsing is pure and synchronous: no network, no ComfyUI, no image decoding (which may be large and is done
off the event loop by :mod:`supervisor.jobs.inputs`). Any JSON value gives either a ``JobRequest`` or a
:class:`~supervisor.errors.JobError` -- never another exception (property-tested).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from supervisor.config import IMAGE_FORMATS, RESPONSE_FORMATS, Settings, parse_bool
from supervisor.errors import INVALID_PREFIX, UPLOAD_PREFIX, VALIDATION_PREFIX, InvalidInputError, ValidationError
from supervisor.jobs.image_checks import SourceKind, classify_source, validate_name

WORKFLOW_KEYS = ("workflow", "prompt")
OPTION_KEYS = ("images", "timeout_s", "response_format", "image_format", "image_quality", "include_temp")
IMAGE_FORMAT_ALIASES = {"jpg": "jpeg"}
INLINE_INPUT_NAMES = frozenset({"image"})

UI_FORMAT_HINT = (
    "this is a UI-format workflow (it has 'nodes' and 'links'); in ComfyUI use Workflow > Export (API) "
    "and send that file's content as the workflow"
)


@dataclass(frozen=True)
class SuppliedImage:
    """One entry of ``images``: the file name the workflow uses and where its bytes come from."""

    name: str
    source: str  # base64 (data URI prefix optional) or an http(s) URL
    kind: SourceKind
    origin: str  # where it was in the request, for messages: "images[0]"


@dataclass(frozen=True)
class InlineImage:
    """An image given in place of a file name inside a node input (seed 002's LoadImage)."""

    node_id: str
    input_name: str
    source: str
    kind: SourceKind

    @property
    def origin(self) -> str:
        return f"node {self.node_id} input {self.input_name}"


@dataclass(frozen=True)
class JobRequest:
    """A parsed job. ``workflow`` is a private deep copy in the request's node order; options are resolved."""

    workflow: dict[str, dict[str, Any]]
    images: tuple[SuppliedImage, ...] = ()
    inline_images: tuple[InlineImage, ...] = ()
    timeout_s: float = 600.0
    response_format: str | None = None  # None: the front door's configured default
    image_format: str = "png"
    image_quality: int = 90
    include_temp: bool = False
    form: Literal["workflow", "graph"] = "workflow"
    warnings: tuple[str, ...] = field(default=())


def parse_request(raw: Any, settings: Settings) -> JobRequest:
    """Turn a job's ``input`` into a :class:`JobRequest`, or raise InvalidInputError / ValidationError."""
    try:
        return _parse(raw, settings)
    except RecursionError:
        raise InvalidInputError(f"{INVALID_PREFIX}: the input is nested too deeply") from None


def _parse(raw: Any, settings: Settings) -> JobRequest:
    if not isinstance(raw, Mapping):
        raise InvalidInputError(
            f"{INVALID_PREFIX}: the job input must be a JSON object holding a 'workflow' (ComfyUI API format) "
            f"or the workflow itself; got {json_type_name(raw)}"
        )
    if not raw:
        raise InvalidInputError(
            f"{INVALID_PREFIX}: the job input is empty; send {{\"workflow\": {{...}}}} with a ComfyUI "
            "API-format workflow (Workflow > Export (API))"
        )
    if _is_ui_format(raw):
        raise InvalidInputError(f"{INVALID_PREFIX}: {UI_FORMAT_HINT}")
    if _looks_like_graph(raw) or (not any(k in raw for k in WORKFLOW_KEYS) and _has_a_node(raw)):
        workflow = _parse_graph(raw)
        return JobRequest(
            workflow=workflow,
            inline_images=_find_inline_images(workflow),
            timeout_s=_default_timeout(settings),
            image_format=settings.image_format,
            image_quality=settings.image_quality,
            form="graph",
        )
    return _parse_wrapped(raw, settings)


# --- the wrapped form ------------------------------------------------------------------------------


def _parse_wrapped(raw: Mapping[str, Any], settings: Settings) -> JobRequest:
    keys = [k for k in WORKFLOW_KEYS if k in raw]
    if not keys:
        unknown = ", ".join(repr(k) for k in list(raw)[:5])
        raise InvalidInputError(
            f"{INVALID_PREFIX}: no 'workflow' in the job input (keys given: {unknown}); send "
            "{\"workflow\": {...}} with a ComfyUI API-format workflow, or the workflow itself"
        )
    if len(keys) > 1:
        raise InvalidInputError(f"{INVALID_PREFIX}: give either 'workflow' or 'prompt', not both")
    workflow_value = raw[keys[0]]
    if isinstance(workflow_value, str):
        workflow_value = _json_string(workflow_value, keys[0])
    if isinstance(workflow_value, Mapping) and _is_ui_format(workflow_value):
        raise InvalidInputError(f"{INVALID_PREFIX}: {UI_FORMAT_HINT}")
    if not isinstance(workflow_value, Mapping):
        raise InvalidInputError(
            f"{INVALID_PREFIX}: '{keys[0]}' must be an object mapping node ids to "
            f"{{\"class_type\", \"inputs\"}}; got {json_type_name(workflow_value)}"
        )
    if not workflow_value:
        raise InvalidInputError(f"{INVALID_PREFIX}: '{keys[0]}' is empty; it must hold at least one node")
    workflow = _parse_graph(workflow_value)

    problems: list[str] = []
    warnings = [
        f"input.{k} is not a known option and was ignored (known: {', '.join(WORKFLOW_KEYS[:1] + OPTION_KEYS)})"
        for k in raw
        if k not in WORKFLOW_KEYS and k not in OPTION_KEYS
    ]
    timeout_s = _option(problems, raw, "timeout_s", _default_timeout(settings), _timeout)
    if timeout_s > settings.max_job_timeout_s:
        warnings.append(
            f"timeout_s {timeout_s:g} is above this worker's maximum; capped to {settings.max_job_timeout_s:g} s "
            "(MAX_JOB_TIMEOUT_S)"
        )
        timeout_s = settings.max_job_timeout_s
    response_format = _option(problems, raw, "response_format", None, _response_format)
    image_format = _option(problems, raw, "image_format", settings.image_format, _image_format)
    image_quality = _option(problems, raw, "image_quality", settings.image_quality, _image_quality)
    include_temp = _option(problems, raw, "include_temp", False, _boolean)
    if problems:
        raise InvalidInputError.with_problems(INVALID_PREFIX, problems)
    images = _parse_images(raw.get("images"))
    return JobRequest(
        workflow=workflow,
        images=images,
        inline_images=_find_inline_images(workflow),
        timeout_s=timeout_s,
        response_format=response_format,
        image_format=image_format,
        image_quality=image_quality,
        include_temp=include_temp,
        form="workflow",
        warnings=tuple(warnings),
    )


def _option(problems: list[str], raw: Mapping[str, Any], key: str, default: Any, conv: Any) -> Any:
    """Convert one option, collecting a problem line (and returning the default) when it is unusable."""
    if key not in raw or raw[key] is None:
        return default
    try:
        return conv(raw[key])
    except ValueError as exc:
        problems.append(f"{key} {exc}; got {_short(raw[key])}")
        return default


def _timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError("must be a number of seconds greater than 0")
    return float(value)


def _response_format(value: Any) -> str:
    if not isinstance(value, str) or value.strip().lower() not in RESPONSE_FORMATS:
        raise ValueError("must be one of " + ", ".join(RESPONSE_FORMATS))
    return value.strip().lower()


def _image_format(value: Any) -> str:
    text = value.strip().lower() if isinstance(value, str) else None
    text = IMAGE_FORMAT_ALIASES.get(text, text) if text else text
    if text not in IMAGE_FORMATS:
        raise ValueError("must be one of " + ", ".join(IMAGE_FORMATS))
    return text


def _image_quality(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("must be an integer from 1 to 100")
    if value != int(value) or not 1 <= value <= 100:
        raise ValueError("must be an integer from 1 to 100")
    return int(value)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return parse_bool(value)
    raise ValueError("must be true or false")


def _default_timeout(settings: Settings) -> float:
    return min(settings.job_timeout_s, settings.max_job_timeout_s)


def _parse_images(value: Any) -> tuple[SuppliedImage, ...]:
    """Validate ``images``: a list of ``{"name", "image"}`` with safe, distinct names."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidInputError(
            f"{UPLOAD_PREFIX}: 'images' must be a list of {{\"name\", \"image\"}} objects; got {json_type_name(value)}"
        )
    problems: list[str] = []
    images: list[SuppliedImage] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        origin = f"images[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{origin} must be an object {{\"name\", \"image\"}}; got {json_type_name(item)}")
            continue
        name, data = item.get("name"), item.get("image")
        if not isinstance(name, str) or not name:
            problems.append(f"{origin} has no 'name' (the file name the workflow refers to)")
            continue
        try:
            validate_name(name)
        except ValueError as exc:
            problems.append(f"{origin} name {_short(name)} {exc}")
            continue
        if name in seen:
            problems.append(f"{origin} name {name!r} is given twice")
            continue
        seen.add(name)
        if not isinstance(data, str) or not data.strip():
            problems.append(f"{origin} {name!r} has no 'image' (base64, a data URI or an http(s) URL)")
            continue
        kind = classify_source(data)
        if kind is None:
            kind = "base64"  # whatever it is, decoding will say precisely why it is not base64
        images.append(SuppliedImage(name=name, source=data, kind=kind, origin=f"{origin} {name!r}"))
    if problems:
        raise InvalidInputError.with_problems(UPLOAD_PREFIX, problems)
    return tuple(images)


# --- the graph ---------------------------------------------------------------------------------------


def _looks_like_graph(raw: Mapping[str, Any]) -> bool:
    """The whole input is a graph when every value is an object with a ``class_type`` (seed 002's form)."""
    return all(isinstance(v, Mapping) and "class_type" in v for v in raw.values())


def _has_a_node(raw: Mapping[str, Any]) -> bool:
    """Some value is a node: the input is a graph with broken nodes, which deserve per-node messages."""
    return any(isinstance(v, Mapping) and "class_type" in v for v in raw.values())


def _is_ui_format(value: Mapping[str, Any]) -> bool:
    return isinstance(value.get("nodes"), list) and "links" in value


def _parse_graph(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Check the graph's structure and return a private copy; links with integer node ids are normalised."""
    graph: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for node_id, node in raw.items():
        node_id = str(node_id)
        if not isinstance(node, Mapping):
            problems.append(f"node {node_id} must be an object {{\"class_type\", \"inputs\"}}; got {json_type_name(node)}")
            continue
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type.strip():
            problems.append(f"node {node_id} has no class_type (the node's type, e.g. \"KSampler\")")
            continue
        inputs = node.get("inputs", {})
        if not isinstance(inputs, Mapping):
            problems.append(f"node {node_id} ({class_type}): 'inputs' must be an object; got {json_type_name(inputs)}")
            continue
        copied = copy.deepcopy(dict(node))
        copied["inputs"] = {str(k): v for k, v in copied.get("inputs", {}).items()}
        graph[node_id] = copied
    for node_id, node in graph.items():
        for name, value in node["inputs"].items():
            problem = _check_link(graph, node_id, node, name, value)
            if problem:
                problems.append(problem)
    if problems:
        raise ValidationError.with_problems(VALIDATION_PREFIX, problems)
    return graph


def _check_link(graph: dict[str, dict[str, Any]], node_id: str, node: dict[str, Any], name: str, value: Any) -> str:
    """A list value is a link ``[node_id, output_index]``; say what is wrong with it, normalising int ids."""
    if not isinstance(value, list):
        return ""
    where = f"node {node_id} ({node['class_type']}) input {name}"
    if len(value) != 2 or isinstance(value[1], bool) or not isinstance(value[1], int):
        return (
            f"{where}: {_short(value)} is not a link [node_id, output_index]; "
            "to pass a literal list write {\"__value__\": [...]}"
        )
    source = value[0]
    if isinstance(source, int) and not isinstance(source, bool):
        source = str(source)
        value[0] = source
    if not isinstance(source, str) or source not in graph:
        shown = source[:40] if isinstance(source, str) else _short(value[0])
        return f"{where}: links to node {shown}, which is not in the workflow"
    return ""


def _find_inline_images(workflow: dict[str, dict[str, Any]]) -> tuple[InlineImage, ...]:
    """Node inputs named ``image`` that hold a data URI, a URL or something that may be base64 image data."""
    found = []
    for node_id, node in workflow.items():
        for name, value in node["inputs"].items():
            if name in INLINE_INPUT_NAMES and isinstance(value, str):
                kind = classify_source(value, inline=True)
                if kind is not None:
                    found.append(InlineImage(node_id=node_id, input_name=name, source=value, kind=kind))
    return tuple(found)


# --- small helpers -----------------------------------------------------------------------------------


def _json_string(text: str, key: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidInputError(f"{INVALID_PREFIX}: '{key}' is a string but not valid JSON ({exc})") from None


def json_type_name(value: Any) -> str:
    """What a JSON value is, for messages: 'a string', 'a list', 'an object'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    """A value for a message: repr, cut to ``limit`` characters (inputs can be megabytes of base64)."""
    try:
        text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
