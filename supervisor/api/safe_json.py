"""JSON values from clients that the worker can store and send back, and results made sendable.

Python's JSON decoder accepts things the rest of the way cannot carry: ``"\\ud800"`` decodes to a lone
surrogate, which SQLite (the journal) and every UTF-8 encoder (an HTTP reply, the RunPod SDK's result POST)
refuse; and nesting ~1000 levels deep exhausts the interpreter's recursion limit somewhere later. So both front
doors check a client's JSON once, at intake (:func:`json_problem`), and refuse it naming the field; and a value
the worker sends out is passed through :func:`sendable`, which escapes any text that still cannot be encoded
(an error message that quotes a bad input, say) instead of losing the whole result.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON_DEPTH = 100  # a ComfyUI graph in a job body is about 6 levels deep
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _escaped(text: str) -> str:
    """ASCII-only JSON spelling of ``text`` without the quotes: always encodable, readable in a message."""
    return json.dumps(text)[1:-1]


def field_path(root: str, keys: tuple[Any, ...]) -> str:
    """``input.workflow["6"].inputs.text`` for the keys under ``root``; the path itself is always encodable."""
    out = root
    for key in keys:
        if isinstance(key, int):
            out += f"[{key}]"
        elif _NAME_RE.match(key):
            out += f".{key}" if out else key
        else:
            out += f"[{json.dumps(key)}]"
    return out or "the body"


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (a lone surrogate and where), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = _escaped(text[exc.start])
        return (f"holds {bad} at character {exc.start}, a lone surrogate: not valid Unicode, so it cannot be "
                "stored or sent; send valid UTF-8 text")
    return None


def json_problem(value: Any, root: str = "") -> str | None:
    """The first reason a decoded JSON value cannot be stored and sent, naming where it is; None when it can."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        item, keys = stack.pop()
        if len(keys) > MAX_JSON_DEPTH:
            return f"{field_path(root, keys[:3])}... is nested deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                return f"{field_path(root, keys)} {problem}"
        elif isinstance(item, dict):
            for key, child in item.items():
                problem = text_problem(key) if isinstance(key, str) else None
                if problem:
                    return f"a key of {field_path(root, keys)} ('{_escaped(key)}') {problem}"
                stack.append((child, (*keys, key)))
        elif isinstance(item, list):
            stack.extend((child, (*keys, i)) for i, child in enumerate(item))
    return None


def sendable(value: Any) -> Any:
    """``value`` with every string that cannot be encoded as UTF-8 escaped (``\\ud800`` spelled out).

    The same object comes back when nothing needed escaping, so a large result is not copied.
    """
    if isinstance(value, str):
        return value if text_problem(value) is None else value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        pairs = [(sendable(k) if isinstance(k, str) else k, sendable(v)) for k, v in value.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(pairs, value.items())):
            return value
        return dict(pairs)
    if isinstance(value, list):
        items = [sendable(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else items
    return value
