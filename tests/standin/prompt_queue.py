"""ComfyUI's PromptQueue: a min-heap of pending prompts, the running ones, history and worker flags.

Every change calls ``server.queue_updated()`` which broadcasts ``status`` — that is why a client sees two
identical ``status`` messages right after ``POST /prompt`` (put, then the worker's get). Deleting the last
pending item sends two as well (ComfyUI wipes the queue and then notifies again).
"""

from __future__ import annotations

import copy
import heapq
import threading
from typing import Any

MAXIMUM_HISTORY_SIZE = 10000


class PromptQueue:
    def __init__(self, server: Any) -> None:
        self.server = server
        self.mutex = threading.RLock()
        self.not_empty = threading.Condition(self.mutex)
        self.task_counter = 0
        self.queue: list[tuple] = []
        self.currently_running: dict[int, tuple] = {}
        self.history: dict[str, dict] = {}
        self.flags: dict[str, Any] = {}

    def put(self, item: tuple) -> None:
        with self.mutex:
            heapq.heappush(self.queue, item)
            self.server.queue_updated()
            self.not_empty.notify()

    def get(self, timeout: float | None = None) -> tuple[tuple, int] | None:
        with self.not_empty:
            while len(self.queue) == 0:
                self.not_empty.wait(timeout=timeout)
                if timeout is not None and len(self.queue) == 0:
                    return None
            item = heapq.heappop(self.queue)
            i = self.task_counter
            self.currently_running[i] = copy.deepcopy(item)
            self.task_counter += 1
            self.server.queue_updated()
            return (item, i)

    def task_done(self, item_id: int, history_result: dict, status: dict | None, process_item=None) -> None:
        """Move the running item to history: ``prompt``, ``outputs``, ``status``, then ``meta`` (that order)."""
        with self.mutex:
            prompt = self.currently_running.pop(item_id)
            if len(self.history) > MAXIMUM_HISTORY_SIZE:
                self.history.pop(next(iter(self.history)))
            if process_item is not None:
                prompt = process_item(prompt)
            self.history[prompt[1]] = {"prompt": prompt, "outputs": {}, "status": copy.deepcopy(status)}
            self.history[prompt[1]].update(history_result)
            self.server.queue_updated()

    def get_current_queue(self) -> tuple[list, list]:
        with self.mutex:
            return list(self.currently_running.values()), copy.deepcopy(self.queue)

    def get_tasks_remaining(self) -> int:
        with self.mutex:
            return len(self.queue) + len(self.currently_running)

    def wipe_queue(self) -> None:
        with self.mutex:
            self.queue = []
            self.server.queue_updated()

    def delete_queue_item(self, function) -> bool:
        with self.mutex:
            for x in range(len(self.queue)):
                if function(self.queue[x]):
                    if len(self.queue) == 1:
                        self.wipe_queue()
                    else:
                        self.queue.pop(x)
                        heapq.heapify(self.queue)
                    self.server.queue_updated()
                    return True
        return False

    def get_history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict:
        with self.mutex:
            if prompt_id is None:
                out = {}
                i = 0
                if offset < 0 and max_items is not None:
                    offset = len(self.history) - max_items
                for k in self.history:
                    if i >= offset:
                        out[k] = self.history[k]
                        if max_items is not None and len(out) >= max_items:
                            break
                    i += 1
                return copy.deepcopy(out)
            if prompt_id in self.history:
                return {prompt_id: copy.deepcopy(self.history[prompt_id])}
            return {}

    def wipe_history(self) -> None:
        with self.mutex:
            self.history = {}

    def delete_history_item(self, id_to_delete: str) -> None:
        with self.mutex:
            self.history.pop(id_to_delete, None)

    def set_flag(self, name: str, data: Any) -> None:
        with self.mutex:
            self.flags[name] = data
            self.not_empty.notify()

    def get_flags(self, reset: bool = True) -> dict:
        with self.mutex:
            if reset:
                ret = self.flags
                self.flags = {}
                return ret
            return self.flags.copy()
