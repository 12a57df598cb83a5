"""How a model fetch fails: a reported error, a retryable one, and the flag that stops every download at Ctrl-C."""

from __future__ import annotations

import threading

TRANSIENT_STATUS = (408, 425, 429, 500, 502, 503, 504)


class FetchError(Exception):
    """One entry could not be fetched; the message is the line a user reads in the build log."""


class Transient(Exception):
    """A failure worth retrying (network cut, short body, 5xx); the kept .part is resumed."""


class Oversize(FetchError):
    """The server sent more bytes than the file has: the part is garbage and is deleted."""


class Interrupted(FetchError):
    """Ctrl-C / SIGINT: every download stops at its next chunk and keeps its part for the next run."""


STOP = threading.Event()
