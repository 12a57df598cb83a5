#!/usr/bin/env python3
"""Fetch the models a models.yaml lists into a ComfyUI models tree, every byte checked against a SHA-256.

    fetch_models.py [fetch] [--dry-run] [--manifest F] [--models-dir D] [--cache D] [--jobs N] [--only NAME]
                            [--record FILE]
    fetch_models.py lock    [--dry-run] [--manifest F]
    fetch_models.py check   [--manifest F]

Why not ``hf_hub_download``: it never hashes what it downloads and does not resume across calls (see
docs/manifest.md). So huggingface_hub does what it is good at -- endpoint, auth, URL resolution, metadata and the
LFS sha256 -- and this script streams the body itself: the SHA-256 is computed while the bytes arrive, a cut
download keeps its ``.part`` and the next call resumes it with ``Range``, and a file is only renamed into place
once its hash is right. Tokens come from BuildKit secret files (``/run/secrets/<NAME>``) or the environment and
are never printed.

This file is the command line; the fetcher itself is in ``scripts/buildlib/`` (see its ``__init__``). ``check``
imports only the standard library and PyYAML; ``fetch`` and ``lock`` load the download stack. A missing one of
those packages exits 3 with one line naming the package to install.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# Only what `check` needs: the standard library and PyYAML. The download stack (httpx2, huggingface_hub) is
# imported by `fetch` and `lock` alone, below.
from buildlib.common import ConfigError, Redactor, Secrets, install_hint, redacted_stdio  # noqa: E402
from buildlib.manifest import ManifestError, load_manifest, missing_hashes  # noqa: E402
from buildlib.models.config import PROG, PROGRESS_MODES, FetchConfig  # noqa: E402

EXIT_INVALID = 2
EXIT_MISSING_DEPENDENCY = 3


def parse_args(argv: list[str], cfg: FetchConfig) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fetch_models.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    for name, help_text in (("fetch", "download and verify every entry (the default command)"),
                            ("lock", "fill missing sha256 and pin hf revisions to commits, in place"),
                            ("check", "validate the manifest only (no network)")):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("--manifest", type=Path, default=cfg.manifest, help=f"default {cfg.manifest}")
        if name in ("fetch", "lock"):
            sp.add_argument("--dry-run", action="store_true",
                            help="fetch: print the plan and total size without network; lock: show, do not write")
        if name == "fetch":
            sp.add_argument("--models-dir", type=Path, default=cfg.models_dir, help=f"default {cfg.models_dir}")
            sp.add_argument("--cache", type=Path, default=cfg.cache_dir, help="content-addressed cache dir")
            sp.add_argument("--jobs", type=int, default=cfg.jobs, help=f"parallel downloads (default {cfg.jobs})")
            sp.add_argument("--retries", type=int, default=cfg.retries, help=f"per file (default {cfg.retries})")
            sp.add_argument("--progress", choices=PROGRESS_MODES, default=cfg.progress)
            sp.add_argument("--only", action="append", default=[], metavar="NAME",
                            help="fetch only this entry (name or folder/filename); repeatable")
            sp.add_argument("--record", type=Path, default=None, metavar="FILE",
                            help="after a successful fetch, write each model's path, sha256 and size as JSON here")
    if not argv or argv[0] not in ("fetch", "lock", "check", "-h", "--help"):
        argv = ["fetch", *argv]
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    redact = Redactor()
    with redacted_stdio(redact):
        try:
            cfg = FetchConfig.from_env(os.environ)
        except ConfigError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return EXIT_INVALID
        args = parse_args(sys.argv[1:] if argv is None else argv, cfg)
        overrides = {k: getattr(args, a) for k, a in (("manifest", "manifest"), ("models_dir", "models_dir"),
                     ("cache_dir", "cache"), ("jobs", "jobs"), ("retries", "retries"), ("progress", "progress"))
                     if hasattr(args, a)}
        cfg = dataclasses.replace(cfg, **overrides)
        secrets = Secrets(cfg.secrets_dir, os.environ)
        try:
            manifest = load_manifest(cfg.manifest)
            for name in {e.secret for e in manifest.entries if e.secret} | {"HF_TOKEN", "CIVITAI_TOKEN"}:
                redact.add(secrets.get(name))
            if args.command == "check":
                print(f"{PROG}: {manifest.path}: {len(manifest.entries)} entries, valid", file=sys.stderr)
                for problem in missing_hashes(manifest):
                    print(f"{PROG}: notice: {problem}", file=sys.stderr)
                return 0
            if args.command == "lock":
                from buildlib.models.lock import cmd_lock

                return cmd_lock(cfg, manifest, secrets, args.dry_run)
            from buildlib.models.fetch import cmd_fetch

            return cmd_fetch(cfg, manifest, secrets, args.dry_run, args.only, args.record)
        except ManifestError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return EXIT_INVALID
        except ModuleNotFoundError as exc:
            hint = install_hint(exc)
            if hint is None:
                raise
            print(f"{PROG}: error: {hint}, or use the worker's venv: .venv/bin/python {sys.argv[0]}", file=sys.stderr)
            return EXIT_MISSING_DEPENDENCY
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; partial downloads are kept for the next run", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
