"""What a fetch will do, decided without network: the targets (entry, destination, token), the optional entries
skipped for want of their secret, the problems that stop the build, and the ``--dry-run`` table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..common import Secrets, human_size
from ..manifest import HfSource, Manifest, ModelEntry, missing_hashes
from .config import PROG, FetchConfig


@dataclass(frozen=True)
class Target:
    """One entry to fetch: where its file goes, and the token its source is sent (never shown)."""

    entry: ModelEntry
    dest: Path
    token: str | None = field(repr=False, default=None)
    token_name: str | None = None


@dataclass
class Plan:
    """The targets to fetch, the notices for skipped optional entries, and the problems that stop the fetch."""

    targets: list[Target]
    skipped: list[str]
    problems: list[str]


def plan(manifest: Manifest, cfg: FetchConfig, secrets: Secrets, only: list[str]) -> Plan:
    """Decide what to fetch: skip optional entries without their secret, refuse required ones, no network."""
    entries = [e for e in manifest.entries if not only or e.name in only or e.destination in only]
    unknown = [n for n in only if not any(n in (e.name, e.destination) for e in manifest.entries)]
    problems = [f"--only {n!r} names no entry of {manifest.path}" for n in unknown]
    targets, skipped = [], []
    for e in entries:
        token = secrets.get(e.secret) if e.secret else None
        if e.secret and token is None:
            how = f"give it as a BuildKit secret ({cfg.secrets_dir}/{e.secret}) or as environment variable {e.secret}"
            if e.optional:
                skipped.append(f"{PROG}: notice: skipping optional {e.label}: its secret {e.secret} was not supplied "
                               f"({how})")
                continue
            problems.append(f"{manifest.path}: {e.label}: needs secret {e.secret}, which was not supplied; {how}")
            continue
        if token is None and isinstance(e.source, HfSource) and e.secret is None:
            token = secrets.get("HF_TOKEN")  # like huggingface_hub: HF_TOKEN, when given, authenticates hub calls
            name = "HF_TOKEN" if token else None
        else:
            name = e.secret
        targets.append(Target(e, cfg.models_dir / e.folder / e.filename, token, name))
    problems += missing_hashes(manifest, [t.entry for t in targets])
    return Plan(targets, skipped, problems)


def print_plan(p: Plan, manifest: Manifest, cfg: FetchConfig, secrets: Secrets) -> None:
    """The --dry-run table: what would be fetched from where, with known sizes; no network is used."""
    print(f"plan for {manifest.path} -> {cfg.models_dir}" + (f" (cache {cfg.cache_dir})" if cfg.cache_dir else ""))
    total, unknown = 0, 0
    for t in p.targets:
        e = t.entry
        if e.size is None:
            unknown += 1
        else:
            total += e.size
        state = "present (will verify)" if t.dest.exists() else "to fetch"
        sha = e.sha256 or ("the hub's, fetched at build time" if isinstance(e.source, HfSource) else "MISSING (run lock)")
        secret = f", secret {e.secret}: {secrets.describe(e.secret)}" if e.secret else ""
        print(f"  {e.label}: {e.destination} <- {e.source.describe()}")
        print(f"      size {human_size(e.size)}, sha256 {sha}, {state}{secret}")
    for line in p.skipped:
        print(f"  {line}")
    sizes = human_size(total) + (f" + {unknown} file(s) of unknown size (run `lock`)" if unknown else "")
    print(f"total: {len(p.targets)} file(s), {sizes}")
