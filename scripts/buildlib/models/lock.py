"""The ``lock`` command: fill missing sha256 and sizes from the sources' published metadata and pin hf revisions
to commits, editing models.yaml in place (its comments kept)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ..common import Secrets
from ..manifest import COMMIT_RE, CivitaiSource, HfSource, Manifest, ModelEntry, edit_manifest_text
from .config import PROG, FetchConfig
from .errors import FetchError, Transient
from .hub import Sources, civitai_sha256
from .plan import Target


def cmd_lock(cfg: FetchConfig, manifest: Manifest, secrets: Secrets, dry_run: bool) -> int:
    """Fill missing sha256 (hub LFS metadata, Civitai's published hash) and pin hf revisions to commits."""
    text = manifest.path.read_text(encoding="utf-8")
    changes: dict[int, dict[str, Any]] = {}
    problems: list[str] = []
    sources = Sources(cfg, lambda m: print(m, file=sys.stderr))
    for e in manifest.entries:
        token = secrets.get(e.secret) if e.secret else None
        if e.secret and token is None and not isinstance(e.source, CivitaiSource):  # Civitai's metadata is public
            line = f"{e.label}: needs secret {e.secret}, which was not supplied"
            if e.optional:
                print(f"{PROG}: notice: lock skips optional {line}", file=sys.stderr)
            else:
                problems.append(line)
            continue
        try:
            change = _lock_entry(e, token, cfg, sources)
        except (FetchError, Transient) as exc:
            problems.append(str(exc) if isinstance(exc, FetchError) else f"{e.label}: {exc}")
            continue
        if change:
            changes[e.index] = change
            shown = ", ".join(f"{k}: {v}" for k, v in change.items())
            print(f"{PROG}: lock {e.label}: {shown}", file=sys.stderr)
    if changes and not dry_run:
        new_text = edit_manifest_text(text, manifest, changes)
        tmp = manifest.path.with_name(f".{manifest.path.name}.lock-tmp")
        tmp.write_text(new_text, encoding="utf-8")
        os.replace(tmp, manifest.path)
        print(f"{PROG}: wrote {len(changes)} change(s) to {manifest.path}", file=sys.stderr)
    elif not changes:
        print(f"{PROG}: {manifest.path} is already locked", file=sys.stderr)
    for problem in problems:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _lock_entry(e: ModelEntry, token: str | None, cfg: FetchConfig, sources: Sources) -> dict[str, Any]:
    src = e.source
    if isinstance(src, HfSource):
        t = Target(e, Path("/nonexistent"), token, e.secret)
        remote = sources.resolve(t)
        change: dict[str, Any] = {}
        if remote.commit and not COMMIT_RE.fullmatch(src.revision):
            change["hf.revision"] = remote.commit
        if remote.sha256 is None:
            if e.sha256 is None:
                raise FetchError(f"{e.label}: the hub publishes no sha256 for {src.describe()} (not an LFS file); "
                                 "add 'sha256' by hand")
        elif e.sha256 is None:
            change["sha256"] = remote.sha256
        elif e.sha256 != remote.sha256:
            raise FetchError(f"{e.label}: the manifest pins sha256 {e.sha256} but the hub has {remote.sha256} at "
                             f"commit {remote.commit}; remove 'sha256' to accept the hub's, or pin the revision")
        if e.size is None and remote.size:
            change["size"] = remote.size
        return change
    if isinstance(src, CivitaiSource):
        if e.sha256 is not None:
            return {}
        return {"sha256": civitai_sha256(e, src, token, cfg)}
    if e.sha256 is None:
        raise FetchError(f"{e.label}: url sources publish no hash; add 'sha256' by hand (sha256sum of the file)")
    return {}
