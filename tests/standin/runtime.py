"""What nodes share with the executor: the interrupt flag, the progress-bar hook, ComfyUI's exceptions.

In ComfyUI these live in ``comfy.model_management`` (interrupt, OOM) and ``comfy.utils`` (ProgressBar and
its global hook); the stand-in keeps them in one small module that nodes and packs may import.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

ARGS = None  # the parsed command line, set by main.py (nodes read e.g. --disable-metadata)

_interrupt_lock = threading.Lock()
_interrupt_processing = False


class InterruptProcessingException(Exception):
    """Raised at the next node boundary or sampler step after ``POST /interrupt``."""


class OutOfMemoryError(RuntimeError):
    """Named like torch's so ``execution_error.exception_type`` reads ``torch.OutOfMemoryError``."""


OutOfMemoryError.__module__ = "torch"

OOM_EXCEPTION = OutOfMemoryError


def interrupt_current_processing(value: bool = True) -> None:
    global _interrupt_processing
    with _interrupt_lock:
        _interrupt_processing = value


def processing_interrupted() -> bool:
    with _interrupt_lock:
        return _interrupt_processing


def throw_exception_if_processing_interrupted() -> None:
    """ComfyUI's check: consumes the flag and raises, so one interrupt stops one prompt."""
    global _interrupt_processing
    with _interrupt_lock:
        if _interrupt_processing:
            _interrupt_processing = False
            raise InterruptProcessingException()


ProgressHook = Callable[[int, int, object], None]
_progress_hook: ProgressHook | None = None


def set_progress_bar_global_hook(hook: ProgressHook | None) -> None:
    global _progress_hook
    _progress_hook = hook


class ProgressBar:
    """comfy.utils.ProgressBar: every update goes through the global hook (which checks the interrupt)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.current = 0
        self.hook = _progress_hook

    def update_absolute(self, value: int, total: int | None = None, preview: object = None) -> None:
        if total is not None:
            self.total = total
        if value > self.total:
            value = self.total
        self.current = value
        if self.hook is not None:
            self.hook(self.current, self.total, preview)

    def update(self, value: int) -> None:
        self.update_absolute(self.current + value)
