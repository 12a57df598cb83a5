"""Prompt execution, following ComfyUI 0.3.64's ``execution.py`` event by event.

What a client observes is reproduced: ``execution_start``, ``execution_cached`` (every prompt node whose
output is cached), per node ``progress_state`` (running) -> ``executing`` -> [``progress``...] ->
``executed`` (UI output) -> ``progress_state`` (finished); cached output nodes only replay ``executed``;
``execution_success`` / ``execution_error`` / ``execution_interrupted`` end the run. The classic cache
keys every node by an input signature (class, IS_CHANGED, constants, upstream signatures) and keeps only
the last prompt's entries, so an identical resubmission re-runs nothing and writes no new file.
The interrupt flag is checked right after ``executing`` is sent and at every progress step.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faults
import nodes
import runtime
from nodes.values import digest
from validation import full_type_name, get_input_info

OOM_TIPS = ("This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you might "
            "have accidentally set the batch_size to a large number.")

CUDA_OOM_MESSAGE = (
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 23.55 GiB of which 3.06 MiB "
    "is free. Including non-PyTorch memory, this process has 23.54 GiB memory in use. Of the allocated memory "
    "22.91 GiB is allocated by PyTorch, and 178.36 MiB is reserved by PyTorch but unallocated. If reserved but "
    "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
    "fragmentation.  See documentation for Memory Management  "
    "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")

SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


def is_link(obj: Any) -> bool:
    return (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str)
            and isinstance(obj[1], (int, float)) and not isinstance(obj[1], bool))


@dataclass
class CacheEntry:
    """A node's outputs plus its UI output (what ``executed`` carried), as ComfyUI's CacheEntry."""

    outputs: tuple
    ui: dict | None = None


class OutputCache:
    """Output cache keyed by input signature.

    ``classic`` (ComfyUI's default) keeps only the entries the current prompt uses; ``none``
    (``--cache-none``) keeps nothing between prompts; ``lru`` (``--cache-lru N``) keeps the N most recently
    used entries across prompts.
    """

    def __init__(self, mode: str = "classic", size: int = 0) -> None:
        self.mode = mode
        self.size = size
        self.entries: dict[str, CacheEntry] = {}
        self.keys: dict[str, str] = {}  # node id -> signature for the prompt being executed

    def set_prompt(self, prompt: dict) -> None:
        signatures: dict[str, str] = {}
        for node_id in prompt:
            _signature(prompt, node_id, signatures, set())
        self.keys = signatures
        used = set(signatures.values())
        if self.mode == "none":
            self.entries = {}
        elif self.mode == "lru":
            kept = list(self.entries.items())[-self.size:] if self.size > 0 else []
            self.entries = dict(kept)
        else:
            self.entries = {k: v for k, v in self.entries.items() if k in used}

    def get(self, node_id: str) -> CacheEntry | None:
        key = self.keys.get(node_id)
        if key is None or key not in self.entries:
            return None
        if self.mode == "lru":
            self.entries[key] = self.entries.pop(key)  # most recently used last
        return self.entries[key]

    def set(self, node_id: str, entry: CacheEntry) -> None:
        key = self.keys.get(node_id)
        if key is not None:
            self.entries.pop(key, None)
            self.entries[key] = entry

    def all_node_ids(self) -> list[str]:
        return list(self.keys)

    def reset(self) -> None:
        self.entries.clear()
        self.keys.clear()


def cache_from_args(args: Any) -> OutputCache:
    """--cache-none / --cache-lru N / classic (default)."""
    if args is not None and getattr(args, "cache_none", False):
        return OutputCache("none")
    if args is not None and getattr(args, "cache_lru", 0) > 0:
        return OutputCache("lru", args.cache_lru)
    return OutputCache()


_UNCACHEABLE = 0


def _is_changed(class_def: type, inputs: dict) -> Any:
    """IS_CHANGED with the node's constant inputs; an exception means "always changed" (NaN in ComfyUI)."""
    global _UNCACHEABLE
    fn = getattr(class_def, "IS_CHANGED", None)
    if fn is None:
        return None
    try:
        import inspect  # noqa: PLC0415
        spec = inspect.getfullargspec(fn)
        args = {k: v for k, v in inputs.items() if not is_link(v) and (k in spec.args or spec.varkw)}
        return fn(**args)
    except Exception as e:  # noqa: BLE001
        logging.warning("WARNING: {}".format(e))
        _UNCACHEABLE += 1
        return ("nan", _UNCACHEABLE, time.time())


def _signature(prompt: dict, node_id: str, memo: dict[str, str], visiting: set[str]) -> str:
    """Input signature of a node: class, IS_CHANGED, constants and the signatures of linked nodes."""
    if node_id in memo:
        return memo[node_id]
    node = prompt.get(node_id)
    if node is None or node_id in visiting:
        return digest("missing", node_id)
    visiting.add(node_id)
    class_type = node["class_type"]
    class_def = nodes.NODE_CLASS_MAPPINGS.get(class_type)
    parts: list[Any] = [class_type]
    if class_def is not None:
        parts.append(_is_changed(class_def, node["inputs"]))
        if getattr(class_def, "NOT_IDEMPOTENT", False):
            parts.append(("node", node_id))
    for name in sorted(node["inputs"]):
        value = node["inputs"][name]
        if is_link(value):
            parts.append((name, "link", _signature(prompt, value[0], memo, visiting), value[1]))
        else:
            parts.append((name, value))
    visiting.discard(node_id)
    memo[node_id] = digest(*parts)
    return memo[node_id]


class ExecutionList:
    """ComfyUI's TopologicalSort/ExecutionList: cached inputs are not staged; outputs are picked first."""

    def __init__(self, prompt: dict, cache: OutputCache) -> None:
        self.prompt = prompt
        self.cache = cache
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, dict]] = {}
        self.staged: str | None = None

    def is_cached(self, node_id: str) -> bool:
        return self.cache.get(node_id) is not None

    def add_node(self, node_unique_id: str) -> None:
        node_ids = [node_unique_id]
        links = []
        while node_ids:
            unique_id = node_ids.pop()
            if unique_id in self.pending:
                continue
            self.pending[unique_id] = True
            self.block_count[unique_id] = 0
            self.blocking[unique_id] = {}
            inputs = self.prompt[unique_id]["inputs"]
            for input_name in inputs:
                value = inputs[input_name]
                if is_link(value):
                    from_node_id, from_socket = value
                    class_def = nodes.NODE_CLASS_MAPPINGS[self.prompt[unique_id]["class_type"]]
                    _, _, info = get_input_info(class_def, input_name)
                    if info is not None and info.get("lazy"):
                        continue
                    if not self.is_cached(from_node_id):
                        node_ids.append(from_node_id)
                    links.append((from_node_id, from_socket, unique_id))
        for link in links:
            self.add_strong_link(*link)

    def add_strong_link(self, from_node_id: str, from_socket: int, to_node_id: str) -> None:
        if not self.is_cached(from_node_id):
            self.add_node(from_node_id)
            if to_node_id not in self.blocking[from_node_id]:
                self.blocking[from_node_id][to_node_id] = {}
                self.block_count[to_node_id] += 1
            self.blocking[from_node_id][to_node_id][from_socket] = True

    def is_empty(self) -> bool:
        return len(self.pending) == 0

    def _is_output(self, node_id: str) -> bool:
        return nodes.is_output_node(nodes.NODE_CLASS_MAPPINGS[self.prompt[node_id]["class_type"]])

    def _pick(self, ready: list[str]) -> str:
        for node_id in ready:
            if self._is_output(node_id):
                return node_id
        for node_id in ready:
            if any(self._is_output(b) for b in self.blocking[node_id]):
                return node_id
        for node_id in ready:
            for b in self.blocking[node_id]:
                if any(self._is_output(b1) for b1 in self.blocking[b]):
                    return node_id
        return ready[0]

    def stage_node_execution(self) -> tuple[str | None, dict | None, Exception | None]:
        ready = [n for n in self.pending if self.block_count[n] == 0]
        if not ready:
            cycle = list(self.pending)
            error = {"node_id": cycle[0], "exception_message": "Dependency cycle detected",
                     "exception_type": "graph.DependencyCycleError", "traceback": [], "current_inputs": []}
            return None, error, RuntimeError("Dependency cycle detected")
        self.staged = self._pick(ready)
        return self.staged, None, None

    def complete_node_execution(self) -> None:
        node_id = self.staged
        del self.pending[node_id]
        for blocked in self.blocking[node_id]:
            self.block_count[blocked] -= 1
        del self.blocking[node_id]
        self.staged = None


class ProgressRegistry:
    """Per-prompt node states, sent whole as ``progress_state`` on every change (ComfyUI's WebUI handler)."""

    def __init__(self, server: Any, prompt_id: str) -> None:
        self.server = server
        self.prompt_id = prompt_id
        self.nodes: dict[str, dict] = {}

    def _entry(self, node_id: str) -> dict:
        if node_id not in self.nodes:
            self.nodes[node_id] = {"state": "pending", "value": 0, "max": 1}
        return self.nodes[node_id]

    def start(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(state="running", value=0.0, max=1.0)
        self._send()

    def update(self, node_id: str, value: float, max_value: float) -> None:
        entry = self._entry(node_id)
        entry.update(state="running", value=value, max=max_value)
        self._send()

    def finish(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(state="finished", value=entry["max"])
        self._send()

    def _send(self) -> None:
        active = {
            node_id: {"value": s["value"], "max": s["max"], "state": s["state"], "node_id": node_id,
                      "prompt_id": self.prompt_id, "display_node_id": node_id, "parent_node_id": None,
                      "real_node_id": node_id}
            for node_id, s in self.nodes.items() if s["state"] != "pending"}
        self.server.send_sync("progress_state", {"prompt_id": self.prompt_id, "nodes": active},
                              self.server.client_id)


@dataclass
class RunState:
    """Everything one execution accumulates (ComfyUI keeps these as locals and executor attributes)."""

    prompt_id: str
    prompt: dict
    extra_data: dict
    executed: list[str] = field(default_factory=list)
    ui_outputs: dict[str, dict] = field(default_factory=dict)
    current_node: str | None = None


class PromptExecutor:
    """Runs one prompt at a time on the worker thread; holds the caches across prompts."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.cache = cache_from_args(runtime.ARGS)
        self.objects: dict[tuple[str, str], Any] = {}
        self.status_messages: list[tuple[str, dict]] = []
        self.success = True
        self.history_result: dict = {}
        self.progress: ProgressRegistry | None = None
        self.run: RunState | None = None

    def reset(self) -> None:
        """``/free {"free_memory": true}``: drop every cached output and node object."""
        self.cache.reset()
        self.objects.clear()

    def add_message(self, event: str, data: dict, broadcast: bool) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.status_messages.append((event, data))
        if self.server.client_id is not None or broadcast:
            self.server.send_sync(event, data, self.server.client_id)

    def execute(self, prompt: dict, prompt_id: str, extra_data: dict, execute_outputs: list[str]) -> None:
        runtime.interrupt_current_processing(False)
        self.server.client_id = extra_data.get("client_id")
        self.status_messages = []
        self.success = True
        self.add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)
        self.progress = ProgressRegistry(self.server, prompt_id)
        runtime.set_progress_bar_global_hook(self._progress_hook)
        self.run = RunState(prompt_id, prompt, extra_data)
        self.cache.set_prompt(prompt)
        cached_nodes = [node_id for node_id in prompt if self.cache.get(node_id) is not None]
        self.add_message("execution_cached", {"nodes": cached_nodes, "prompt_id": prompt_id}, broadcast=False)
        current_outputs = self.cache.all_node_ids()
        execution_list = ExecutionList(prompt, self.cache)
        for node_id in list(execute_outputs):
            execution_list.add_node(node_id)
        failed = False
        while not execution_list.is_empty():
            node_id, error, ex = execution_list.stage_node_execution()
            if error is None:
                error, ex = self._execute_node(node_id)
            if error is not None:
                self.success = False
                self._handle_error(prompt_id, prompt, current_outputs, error, ex)
                failed = True
                break
            execution_list.complete_node_execution()
        if not failed:
            self.add_message("execution_success", {"prompt_id": prompt_id}, broadcast=False)
        self.history_result = {
            "outputs": {k: v["output"] for k, v in self.run.ui_outputs.items()},
            "meta": {k: v["meta"] for k, v in self.run.ui_outputs.items()},
        }
        self.server.last_node_id = None
        runtime.set_progress_bar_global_hook(None)

    def _progress_hook(self, value: int, total: int, preview: object) -> None:
        """comfy.utils' global hook as main.py installs it: interrupt check, progress_state, progress."""
        runtime.throw_exception_if_processing_interrupted()
        node_id = self.run.current_node if self.run else self.server.last_node_id
        prompt_id = self.run.prompt_id if self.run else self.server.last_prompt_id
        self.progress.update(node_id, value, total)
        self.server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                              self.server.client_id)

    def _execute_node(self, unique_id: str) -> tuple[dict | None, Exception | None]:
        run = self.run
        node = run.prompt[unique_id]
        class_type = node["class_type"]
        class_def = nodes.NODE_CLASS_MAPPINGS[class_type]
        cached = self.cache.get(unique_id)
        if cached is not None:
            self._replay_cached(unique_id, cached)
            return None, None
        input_data = None
        try:
            self.progress.start(unique_id)
            input_data = self._input_data(node, class_def, unique_id)
            run.current_node = unique_id
            if self.server.client_id is not None:
                self.server.last_node_id = unique_id
                self.server.send_sync("executing", {"node": unique_id, "display_node": unique_id,
                                                    "prompt_id": run.prompt_id}, self.server.client_id)
            runtime.throw_exception_if_processing_interrupted()
            outputs, ui = self._call_node(unique_id, class_type, class_def, input_data)
        except runtime.InterruptProcessingException as iex:
            logging.info("Processing interrupted")
            return {"node_id": unique_id}, iex
        except Exception as ex:  # noqa: BLE001 - every node failure becomes execution_error
            return self._error_details(unique_id, ex, input_data), ex
        if ui:
            meta = {"node_id": unique_id, "display_node": unique_id, "parent_node": None, "real_node_id": unique_id}
            run.ui_outputs[unique_id] = {"meta": meta, "output": ui}
            if self.server.client_id is not None:
                self.server.send_sync("executed", {"node": unique_id, "display_node": unique_id, "output": ui,
                                                   "prompt_id": run.prompt_id}, self.server.client_id)
        self.cache.set(unique_id, CacheEntry(outputs, run.ui_outputs.get(unique_id)))
        self.progress.finish(unique_id)
        run.executed.append(unique_id)
        return None, None

    def _replay_cached(self, unique_id: str, cached: CacheEntry) -> None:
        """A cached output node: re-send its UI output (same file names), run nothing."""
        if self.server.client_id is not None:
            output = cached.ui["output"] if cached.ui else None
            self.server.send_sync("executed", {"node": unique_id, "display_node": unique_id, "output": output,
                                               "prompt_id": self.run.prompt_id}, self.server.client_id)
        if cached.ui is not None:
            self.run.ui_outputs[unique_id] = cached.ui
        self.progress.finish(unique_id)

    def _input_data(self, node: dict, class_def: type, unique_id: str) -> dict:
        """Constants, linked outputs (from the cache) and hidden inputs, by input name."""
        valid_inputs = class_def.INPUT_TYPES()
        data: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            _, category, _ = get_input_info(class_def, name, valid_inputs)
            if category is None:
                continue
            if is_link(value):
                entry = self.cache.get(value[0])
                if entry is None:
                    continue
                data[name] = entry.outputs[int(value[1])]
            else:
                data[name] = value
        for name, kind in valid_inputs.get("hidden", {}).items():
            if kind == "PROMPT":
                data[name] = self.run.prompt
            elif kind == "EXTRA_PNGINFO":
                data[name] = self.run.extra_data.get("extra_pnginfo", None)
            elif kind == "UNIQUE_ID":
                data[name] = unique_id
        return data

    def _call_node(self, unique_id: str, class_type: str, class_def: type, input_data: dict) -> tuple[tuple, dict]:
        """Apply injected faults and delays, then run the node function and split result and UI."""
        _apply_node_fault(unique_id, class_type, self.server.flush_sync)
        delay = faults.node_delay()
        if delay > 0:
            time.sleep(delay)
        key = (unique_id, class_type)
        obj = self.objects.get(key)
        if obj is None:
            obj = class_def()
            self.objects[key] = obj
        result = getattr(obj, class_def.FUNCTION)(**input_data)
        ui: dict = {}
        if isinstance(result, dict):
            ui = result.get("ui") or {}
            result = result.get("result", ())
        if result is None:
            result = ()
        return tuple(result), ui

    def _error_details(self, unique_id: str, ex: Exception, input_data: dict | None) -> dict:
        typ, _, tb = sys.exc_info()
        formatted = {}
        if input_data is not None:
            formatted = {name: [_format_value(v)] for name, v in input_data.items()}
        logging.error(f"!!! Exception during processing !!! {ex}")
        logging.error(traceback.format_exc())
        tips = ""
        if isinstance(ex, runtime.OOM_EXCEPTION):
            tips = OOM_TIPS
            logging.error("Got an OOM, unloading all loaded models.")
        return {"node_id": unique_id, "exception_message": "{}\n{}".format(ex, tips),
                "exception_type": full_type_name(typ), "traceback": traceback.format_tb(tb),
                "current_inputs": formatted}

    def _handle_error(self, prompt_id: str, prompt: dict, current_outputs: list[str], error: dict,
                      ex: Exception) -> None:
        node_id = error["node_id"]
        class_type = prompt[node_id]["class_type"]
        mes = {"prompt_id": prompt_id, "node_id": node_id, "node_type": class_type,
               "executed": list(self.run.executed)}
        if isinstance(ex, runtime.InterruptProcessingException):
            self.add_message("execution_interrupted", mes, broadcast=True)
            return
        mes.update({"exception_message": error["exception_message"], "exception_type": error["exception_type"],
                    "traceback": error["traceback"], "current_inputs": error["current_inputs"],
                    "current_outputs": list(current_outputs)})
        self.add_message("execution_error", mes, broadcast=False)


def _format_value(x: Any) -> Any:
    """ComfyUI's format_value: scalars as they are, everything else through str()."""
    if x is None:
        return None
    if isinstance(x, (int, float, bool, str)):
        return x
    return str(x)


def _apply_node_fault(node_id: str, class_type: str, flush: Callable[[], None]) -> None:
    """STANDIN_NODE_FAULT for this node, if any (see faults.py for the contract).

    Before a crash, ``flush`` waits until the events already sent (this node's ``executing``) are out.
    """
    fault = faults.fault_for(node_id, class_type)
    if fault is None:
        return
    print(f"[standin] injecting fault {fault.action} at node {node_id} ({class_type})", file=sys.stderr,
          flush=True)
    if fault.action in ("exit", "kill"):
        flush()
    if fault.action == "exit":
        faults.die(f"standin: injected exit at node {node_id} ({class_type})", _code(fault.arg))
    elif fault.action == "kill":
        faults.kill_self()
    elif fault.action == "hang":
        _hang_server()
    elif fault.action == "error":
        raise Exception(fault.arg if fault.arg else f"standin: injected error at node {node_id} ({class_type})")
    elif fault.action == "oom":
        raise runtime.OutOfMemoryError(CUDA_OOM_MESSAGE)
    elif fault.action == "sleep":  # a long node without a progress bar: /interrupt waits for its end
        time.sleep(faults.seconds(fault.arg, 7.0))


def _code(arg: str | None) -> int:
    try:
        return int(arg) if arg else 1
    except ValueError:
        return 1


HANG_CALLBACK = None  # set by the server: blocks its event loop


def _hang_server() -> None:
    """Freeze the event loop (no HTTP, no websocket) and this worker thread, for good."""
    if HANG_CALLBACK is not None:
        HANG_CALLBACK()
    faults.hang_forever()

