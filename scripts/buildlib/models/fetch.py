"""The ``fetch`` command: plan, then fetch every target in parallel; a failure does not stop the others.

With a record file, a successful fetch also writes what it verified (each entry's name, path under the models
folder, sha256 and size) as JSON: the image build keeps it for its build record (``supervisor/build_record.py``).
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..common import Secrets, write_record
from ..manifest import Manifest
from .config import PROG, FetchConfig
from .download import Fetcher
from .errors import STOP, FetchError, Interrupted
from .plan import Target, plan, print_plan
from .progress import Progress


def cmd_fetch(cfg: FetchConfig, manifest: Manifest, secrets: Secrets, dry_run: bool, only: list[str],
              record: Path | None = None) -> int:
    p = plan(manifest, cfg, secrets, only)
    if dry_run:
        print_plan(p, manifest, cfg, secrets)
        for problem in p.problems:
            print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 1 if p.problems else 0
    for line in p.skipped:
        print(line, file=sys.stderr)
    if p.problems:
        print(f"{PROG}: error: cannot fetch ({len(p.problems)} problem(s)):", file=sys.stderr)
        for problem in p.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    verified: dict[int, dict[str, Any]] = {}
    code = run_targets(cfg, p.targets, verified)
    if code == 0 and record is not None:
        record_models(record, [verified[i] for i in sorted(verified)])
    return code


def record_models(path: Path, models: list[dict[str, Any]]) -> None:
    write_record(path, {"models": models})
    print(f"{PROG}: recorded {len(models)} verified model(s) in {path}", file=sys.stderr)


def run_targets(cfg: FetchConfig, targets: list[Target], verified: dict[int, dict[str, Any]] | None = None) -> int:
    """Fetch in parallel; a failure does not stop the others (their bytes are kept for the next build).

    ``verified`` (by the target's position) receives what each fetched file was verified to be."""
    started = time.monotonic()
    failures: list[str] = []
    counts: dict[str, int] = {}
    tally = threading.Lock()
    with Progress(cfg.progress, cfg.progress_interval_s, cfg.jobs) as progress:
        fetcher = Fetcher(cfg, progress)

        def one(index: int, t: Target) -> None:
            try:
                how, sha256 = fetcher.fetch(t)
            except Exception as exc:  # noqa: BLE001 - reported per entry; unexpected ones with their type
                if isinstance(exc, Interrupted):
                    line = f"{t.entry.label}: interrupted; the part is kept for the next run"
                elif isinstance(exc, FetchError):
                    line = str(exc)
                else:
                    line = f"{t.entry.label}: {type(exc).__name__}: {exc}"
                with tally:
                    failures.append(line)
                progress.log(f"{PROG}: FAILED {line}")
                return
            with tally:
                counts[how] = counts.get(how, 0) + 1
                if verified is not None:
                    verified[index] = {"name": t.entry.name, "path": t.entry.destination, "sha256": sha256,
                                       "size": t.dest.stat().st_size}
            progress.log(f"{PROG}: {how:>10}  {t.entry.destination}")

        pool = ThreadPoolExecutor(max_workers=cfg.jobs, thread_name_prefix="fetch")
        try:
            list(pool.map(one, range(len(targets)), targets))
        except KeyboardInterrupt:
            STOP.set()  # running downloads stop at their next chunk, keeping their parts
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
            fetcher.close()
    summary = ", ".join(f"{n} {how}" for how, n in sorted(counts.items())) or "nothing to do"
    print(f"{PROG}: {summary} in {time.monotonic() - started:.1f}s", file=sys.stderr)
    if failures:
        print(f"{PROG}: error: {len(failures)} entr{'y' if len(failures) == 1 else 'ies'} failed:", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    return 0
