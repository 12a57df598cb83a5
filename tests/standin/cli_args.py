"""ComfyUI's command line (comfy/cli_args.py, 0.3.64), reduced to the flags the stand-in acts on.

Unknown flags are accepted and ignored (``parse_known_args``) so a worker can pass anything it passes to
the real ComfyUI. Defaults are ComfyUI's: port 8188, listen 127.0.0.1, 100 MB upload limit.
"""

from __future__ import annotations

import argparse
import os


def _existing_dir(path: str) -> str:
    """``--user-directory`` must already exist, as ComfyUI's argparse type check demands."""
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"'{path}' is not a valid directory.")
    return path


def build_parser() -> argparse.ArgumentParser:
    """The parser; flags ComfyUI has but the stand-in ignores are still declared where their arity matters."""
    p = argparse.ArgumentParser()
    p.add_argument("--listen", type=str, default="127.0.0.1", metavar="IP", nargs="?", const="0.0.0.0,::")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--tls-keyfile", type=str)
    p.add_argument("--tls-certfile", type=str)
    p.add_argument("--enable-cors-header", type=str, default=None, metavar="ORIGIN", nargs="?", const="*")
    p.add_argument("--max-upload-size", type=float, default=100)
    p.add_argument("--base-directory", type=str, default=None)
    p.add_argument("--extra-model-paths-config", type=str, default=None, metavar="PATH", nargs="+",
                   action="append")
    p.add_argument("--output-directory", type=str, default=None)
    p.add_argument("--temp-directory", type=str, default=None)
    p.add_argument("--input-directory", type=str, default=None)
    p.add_argument("--user-directory", type=_existing_dir, default=None)
    p.add_argument("--auto-launch", action="store_true")
    p.add_argument("--disable-auto-launch", action="store_true")
    p.add_argument("--cpu", action="store_true")
    malloc = p.add_mutually_exclusive_group()
    malloc.add_argument("--cuda-malloc", action="store_true")
    malloc.add_argument("--disable-cuda-malloc", action="store_true")
    p.add_argument("--cache-classic", action="store_true")
    p.add_argument("--cache-lru", type=int, default=0)
    p.add_argument("--cache-none", action="store_true")
    p.add_argument("--disable-metadata", action="store_true")
    p.add_argument("--disable-all-custom-nodes", action="store_true")
    p.add_argument("--whitelist-custom-nodes", type=str, nargs="+", default=[])
    p.add_argument("--quick-test-for-ci", action="store_true")
    p.add_argument("--verbose", default="INFO", const="DEBUG", nargs="?")
    p.add_argument("--log-stdout", action="store_true")
    p.add_argument("--dont-print-server", action="store_true")
    p.add_argument("--database-url", type=str, default=None)
    p.add_argument("--default-hashing-function", type=str, default="sha256",
                   choices=["md5", "sha1", "sha256", "sha512"])
    p.add_argument("--multi-user", action="store_true")
    p.add_argument("--preview-method", type=str, default="none")
    p.add_argument("--enable-compress-response-body", action="store_true")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` (without the program name), ignoring anything unknown as ComfyUI's own parser would not."""
    args, _unknown = build_parser().parse_known_args(argv)
    return args
