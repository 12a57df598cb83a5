"""A throwaway PostgreSQL cluster for tests: ``initdb`` + ``pg_ctl`` in a temporary directory, on a loopback port.

Debian's ``postgresql`` package puts the binaries in /usr/lib/postgresql/<major>/bin and creates the ``postgres``
user; ``initdb`` refuses to run as root, so when the tests run as root the cluster runs as that user. The cluster
is stopped (immediate mode) whatever the outcome, and its directory removed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.standin import free_port

PG_ROOT = Path("/usr/lib/postgresql")
PASSWORD = "fleet-test-secret"


def pg_bin() -> Path | None:
    """The newest installed server's bin directory, or None when PostgreSQL is not installed."""
    found = sorted((p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else None


@dataclass
class PgCluster:
    bin: Path
    dir: Path
    port: int
    user: str | None  # the OS user the server runs as (None: the test's own)

    @property
    def url(self) -> str:
        return self.url_of("fleet")

    def url_of(self, database: str) -> str:
        return f"postgresql://fleet:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def new_database(self, name: str) -> str:
        """A fresh empty database owned by ``fleet`` (one per test: no test sees another's jobs); its URL."""
        self._run("psql", "-h", str(self.dir), "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-c",
                  f'CREATE DATABASE "{name}" OWNER fleet')
        return self.url_of(name)

    def _run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-w", "-t", "30",
                  "-o", f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir}"
                        " -c fsync=off -c max_connections=200", "start")

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "-t", "30", "stop", check=False)

    def psql(self, sql: str, database: str = "fleet") -> list[list[str]]:
        """Rows of a query run as the superuser, each a list of its text fields."""
        out = self._run("psql", "-h", str(self.dir), "-p", str(self.port), "-U", "postgres", "-d", database,
                        "-At", "-F", "\t", "-c", sql)
        return [line.split("\t") for line in out.stdout.splitlines() if line]

    def log_text(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def pg_cluster() -> Iterator[PgCluster]:
    """A running cluster with a database ``fleet`` owned by the password user ``fleet``; gone afterwards."""
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian package `postgresql`; .ci/run installs it)")
    user = "postgres" if os.geteuid() == 0 else None
    tmp = Path(tempfile.mkdtemp(prefix="pg-fleet-"))
    if user is not None:
        info = pwd.getpwnam(user)
        os.chown(tmp, info.pw_uid, info.pw_gid)
    cluster = PgCluster(bindir, tmp, free_port(), user)
    try:
        cluster._run("initdb", "-D", str(tmp / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                     "--no-sync")
        with open(tmp / "data" / "pg_hba.conf", "w") as hba:  # written as root: readable by the server
            hba.write("local all all trust\nhost all postgres 127.0.0.1/32 trust\n"
                      "host all all 127.0.0.1/32 scram-sha-256\n")
        if user is not None:
            os.chown(tmp / "data" / "pg_hba.conf", info.pw_uid, info.pw_gid)
        cluster.start()
        cluster._run("psql", "-h", str(tmp), "-p", str(cluster.port), "-U", "postgres", "-d", "postgres", "-c",
                     f"CREATE ROLE fleet LOGIN PASSWORD '{PASSWORD}'")
        cluster._run("psql", "-h", str(tmp), "-p", str(cluster.port), "-U", "postgres", "-d", "postgres", "-c",
                     "CREATE DATABASE fleet OWNER fleet")
        yield cluster
    finally:
        cluster.stop()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (tmp / "data" / "postmaster.pid").exists():
            time.sleep(0.1)
        shutil.rmtree(tmp, ignore_errors=True)
