#!/usr/bin/env python3
"""Measure what SHA-256 verification costs the model fetcher's download path, on loopback.

    python scripts/bench_fetch.py [--size-mb 512] [--repeats 5] [--rate-mb 200] [--chunk-kb 0] [--json FILE]

Serves one file of --size-mb random-looking bytes from tests/hubserver/server.py on 127.0.0.1 and downloads it
with the fetcher's own streaming code (``buildlib.models.streaming.stream_body``) in three modes, round-robin so drift hits
all modes alike:

* ``none``    -- write only, no hash (the baseline);
* ``inline``  -- hash in the receiving thread (what the fetcher does by default);
* ``thread``  -- hash and write on a helper thread (FETCH_HASH_MODE=thread);

plus ``second-pass``: hashing the finished file again, which is what verifying after ``hf_hub_download`` costs.

Two scenarios: ``loopback`` (unthrottled: the client, the server and the hash compete for the CPU, the worst
case for the overhead) and ``link`` (the server paces the body at --rate-mb MiB/s, like a fast real link; 0
skips it). Prints a table of medians with the client's CPU time (and writes JSON with --json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import httpx2  # noqa: E402
from buildlib.models.streaming import hash_file, stream_body  # noqa: E402
from tests.hubserver.harness import HubServer  # noqa: E402

MODES = ("none", "inline", "thread")


def make_payload(path: Path, size: int) -> None:
    """Write ``size`` bytes that neither compress nor repeat in a way a cache could exploit."""
    block = bytearray()
    seed = 0
    while len(block) < (1 << 20):
        block += hashlib.sha512(seed.to_bytes(8, "little")).digest()
        seed += 1
    with path.open("wb") as f:
        written = 0
        counter = 0
        while written < size:
            piece = hashlib.sha256(counter.to_bytes(8, "little")).digest() + bytes(block[32:])
            piece = piece[: min(len(piece), size - written)]
            f.write(piece)
            written += len(piece)
            counter += 1


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def download(client: httpx2.Client, url: str, dest: Path, mode: str,
             chunk: int | None) -> tuple[float, float, str | None]:
    """One timed download; returns (wall seconds, client CPU seconds, sha256 or None)."""
    hasher = None if mode == "none" else hashlib.sha256()
    start, cpu = time.perf_counter(), _cpu()
    with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as r:
        r.raise_for_status()
        with dest.open("wb") as f:
            stream_body(r.iter_raw(chunk), f, hasher, mode == "thread", lambda n: None, None)
    return time.perf_counter() - start, _cpu() - cpu, hasher.hexdigest() if hasher else None


def scenario(client: httpx2.Client, url: str, dest: Path, expected: str, size_mb: int, repeats: int,
             chunk: int | None) -> dict:
    """All modes, round-robin, ``repeats`` times; medians per mode."""
    times: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    second_pass: list[float] = []
    for _ in range(repeats):
        for mode in MODES:
            elapsed, used, digest = download(client, url, dest, mode, chunk)
            if digest is not None and digest != expected:
                raise SystemExit(f"bench: {mode} produced sha256 {digest}, expected {expected}")
            times[mode].append(elapsed)
            cpu[mode].append(used)
        t0 = time.perf_counter()
        hash_file(dest)
        second_pass.append(time.perf_counter() - t0)
    base = statistics.median(times["none"])
    rows = {}
    for mode in MODES:
        med = statistics.median(times[mode])
        rows[mode] = {"median_s": med, "mb_per_s": size_mb / med, "ratio_vs_none": med / base,
                      "cpu_s": statistics.median(cpu[mode]), "runs_s": times[mode]}
    med2 = statistics.median(second_pass)
    rows["second-pass"] = {"median_s": base + med2, "mb_per_s": size_mb / (base + med2),
                           "ratio_vs_none": (base + med2) / base, "cpu_s": statistics.median(cpu["none"]) + med2,
                           "runs_s": [base + s for s in second_pass]}
    return rows


def run(size_mb: int, repeats: int, chunk_kb: int, rate_mb: int, workdir: Path) -> dict:
    size = size_mb * 1024 * 1024
    root = workdir / "root"
    (root / "files").mkdir(parents=True)
    source = root / "files" / "bench.bin"
    make_payload(source, size)
    expected = hash_file(source).hexdigest()
    dest = workdir / "out.bin"
    chunk = chunk_kb * 1024 or None
    result = {"size_mb": size_mb, "repeats": repeats, "chunk_kb": chunk_kb, "rate_mb": rate_mb,
              "python": sys.version.split()[0], "scenarios": {}}
    with HubServer(root) as server, httpx2.Client(timeout=120) as client:
        url = server.url("/files/bench.bin")
        download(client, url, dest, "none", chunk)  # warm the page cache and the connection
        result["scenarios"]["loopback"] = scenario(client, url, dest, expected, size_mb, repeats, chunk)
        if rate_mb:
            server.faults(rate=rate_mb * 1024 * 1024)
            result["scenarios"][f"link {rate_mb} MiB/s"] = scenario(client, url, dest, expected, size_mb, repeats,
                                                                    chunk)
        dest.unlink()
    return result


def print_table(result: dict) -> None:
    print(f"download of {result['size_mb']} MiB from a loopback server, median of {result['repeats']} runs, "
          f"Python {result['python']}:")
    print(f"  {'scenario':<18} {'mode':<36} {'median s':>9} {'MiB/s':>7} {'vs none':>8} {'CPU s':>7}")
    labels = {"none": "no hash (baseline)", "inline": "sha256 inline (default)", "thread": "sha256 on a helper thread",
              "second-pass": "no hash, then sha256 second pass"}
    for name, rows in result["scenarios"].items():
        for mode, row in rows.items():
            print(f"  {name:<18} {labels[mode]:<36} {row['median_s']:>9.3f} {row['mb_per_s']:>7.0f} "
                  f"{row['ratio_vs_none']:>8.2f} {row['cpu_s']:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=512, help="file size in MiB (default 512)")
    p.add_argument("--repeats", type=int, default=5, help="runs per mode (default 5)")
    p.add_argument("--rate-mb", type=int, default=200, help="paced 'link' scenario in MiB/s; 0 skips it (default 200)")
    p.add_argument("--chunk-kb", type=int, default=0, help="read size; 0 = as the socket delivers (the fetcher's)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-fetch-") as tmp:
        result = run(args.size_mb, args.repeats, args.chunk_kb, args.rate_mb, Path(tmp))
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
