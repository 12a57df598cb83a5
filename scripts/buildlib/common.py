"""Small pieces shared by the build-time tools (model fetcher, node installer).

These tools run inside ``docker build`` with a bare interpreter (huggingface_hub, PyYAML, tqdm), not with the
worker package installed, so they cannot use ``supervisor.config``; this module gives them the same habits:
settings read from the environment once into a typed object, problems collected and reported together, and
secrets that never reach any output.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
BOOL_ACCEPTED = "1/0/true/false/yes/no/on/off (any case)"
REDACTED = "***"
DEFAULT_SECRETS_DIR = Path("/run/secrets")


# The third-party modules the build tools import, and what provides each: the pip requirement (the image's
# FETCH_TOOLS pins) and, where Debian/Ubuntu package it, the system package. Anything else missing is a bug.
THIRD_PARTY = {
    "yaml": ("PyYAML==6.0.3", "python3-yaml"),
    "huggingface_hub": ("huggingface_hub==2.4.0", None),
    "httpx2": ("huggingface_hub==2.4.0", None),  # the HTTP client huggingface_hub 2.x ships with
    "tqdm": ("tqdm", None),
}


def install_hint(exc: ModuleNotFoundError) -> str | None:
    """One line saying which package a missing module comes from and how to install it for this interpreter;
    None when the module is not a third-party dependency (then the import error is a bug and should surface)."""
    top = (exc.name or "").split(".")[0]
    if top not in THIRD_PARTY:
        return None
    requirement, system_package = THIRD_PARTY[top]
    package = requirement.split("==")[0]
    python = sys.executable
    hint = f"{python} cannot import {top!r} (package {package}); install it: {python} -m pip install '{requirement}'"
    if system_package and sys.prefix == sys.base_prefix == "/usr":  # the distribution's own python3
        hint += f" or apt install {system_package}"
    return hint


class ConfigError(ValueError):
    """One or more environment variables hold values the tool cannot use (all of them are listed)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem(s)):\n{lines}")


class EnvReader:
    """Reads typed values from an environment mapping, collecting every problem instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def string(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def path(self, name: str, default: Path | None) -> Path | None:
        value = self.raw(name)
        return Path(value).expanduser() if value else default

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if value.lower() in TRUE_WORDS:
            return True
        if value.lower() in FALSE_WORDS:
            return False
        self.problems.append(f"{name}={value!r} is not valid; accepted: {BOOL_ACCEPTED}")
        return default

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            number = lo - 1
        if not lo <= number <= hi:
            self.problems.append(f"{name}={value!r} is not valid; accepted: an integer from {lo} to {hi}")
            return default
        return number

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            number = lo - 1
        if not lo <= number <= hi:
            self.problems.append(f"{name}={value!r} is not valid; accepted: a number from {lo} to {hi}")
            return default
        return number

    def finish(self) -> None:
        """Raise one :class:`ConfigError` listing every bad variable, if there was any."""
        if self.problems:
            raise ConfigError(self.problems)


class Secrets:
    """Tokens from BuildKit secret files first (``<dir>/<NAME>``), then from the environment.

    BuildKit mounts ``--secret id=HF_TOKEN,...`` at ``/run/secrets/HF_TOKEN`` for one ``RUN`` only, so the token
    never lands in an image layer; the environment is the fallback for local runs. Values are only ever handed to
    HTTP headers: :meth:`describe` says where a secret came from without showing it.
    """

    def __init__(self, directory: Path, env: Mapping[str, str]) -> None:
        self.directory = directory
        self.env = env
        self._cache: dict[str, tuple[str | None, str]] = {}

    def _load(self, name: str) -> tuple[str | None, str]:
        if name not in self._cache:
            self._cache[name] = self._read(name)
        return self._cache[name]

    def _read(self, name: str) -> tuple[str | None, str]:
        file = self.directory / name
        try:
            value = file.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError):
            value = ""
        if value:
            return value, f"secret file {file}"
        value = (self.env.get(name) or "").strip()
        if value:
            return value, f"environment variable {name}"
        return None, "not supplied"

    def get(self, name: str) -> str | None:
        return self._load(name)[0]

    def describe(self, name: str) -> str:
        """Where the secret comes from ("secret file /run/secrets/X", "environment variable X", "not supplied")."""
        return self._load(name)[1]

    def values(self) -> list[str]:
        """Every secret value loaded so far (for the redactor)."""
        return [v for v, _ in self._cache.values() if v]


class Redactor:
    """Replaces known secret values by ``***`` in any text: the last line of defence for logs and errors."""

    MIN_LENGTH = 4  # shorter "secrets" would garble every line they happen to occur in

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add(self, *values: str | None) -> None:
        for value in values:
            if value and len(value) >= self.MIN_LENGTH:
                self._values.add(value)

    def __call__(self, text: str) -> str:
        for value in sorted(self._values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, REDACTED)
        return text


class RedactingStream(io.TextIOBase):
    """A text stream that redacts before writing; stands in for sys.stdout/sys.stderr (tqdm, logging, print)."""

    def __init__(self, inner: TextIO, redact: Redactor) -> None:
        self.inner = inner
        self.redact = redact

    def write(self, text: str) -> int:  # type: ignore[override]
        self.inner.write(self.redact(text))
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def isatty(self) -> bool:
        return self.inner.isatty()

    def fileno(self) -> int:
        return self.inner.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.inner, "encoding", "utf-8")


@contextmanager
def redacted_stdio(redact: Redactor) -> Iterator[None]:
    """Route sys.stdout and sys.stderr through the redactor for the duration of the block."""
    saved = sys.stdout, sys.stderr
    sys.stdout = RedactingStream(saved[0], redact)  # type: ignore[assignment]
    sys.stderr = RedactingStream(saved[1], redact)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = saved


def human_size(n: int | None) -> str:
    """Bytes as a short human figure (binary units), or '?' when unknown."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def env_without(names: list[str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment without the named variables (used to keep tokens away from child processes)."""
    base = dict(os.environ if env is None else env)
    for name in names:
        base.pop(name, None)
    return base


def write_record(path: Path, body: dict[str, object]) -> None:
    """A build-record part as JSON (``--record FILE`` of the fetcher and the installer), written whole or not at
    all: a temporary file renamed into place, so a build that fails midway leaves no half record behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def without_credentials(url: str) -> str:
    """``url`` without a ``user:password@`` part: a token written into a clone URL must not reach a record that
    ends up in an image layer and its labels."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
