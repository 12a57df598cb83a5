#!/usr/bin/env python3
"""Save the images of a job response (RunPod's body, from /runsync or /status) as files.

    python3 examples/save_images.py response.json [output-dir]

Reads every response format of the worker (worker-comfyui, mime, results, base64-list); base64 data is
decoded, URLs (a bucket's presigned URLs) are downloaded. Prints one line per file written. Exits 1 with the
job's error if the job did not complete. Standard library only.
"""

from __future__ import annotations

import base64
import json
import sys
import urllib.request
from pathlib import Path


def items(output: dict) -> list[tuple[str, str]]:
    """(file name, base64 or URL) for every file in any of the worker's response formats."""
    if output.get("status") in ("error", "timeout"):  # results format: failures arrive as output
        raise SystemExit(f"job {output['status']}: {output.get('message')}")
    listed = output.get("results") if "results" in output else output.get("images", [])
    listed = list(listed) + list(output.get("files", []))
    found = []
    for n, item in enumerate(listed, 1):
        if isinstance(item, str):  # base64-list
            found.append((f"output_{n}.png", item))
        else:
            found.append((item["filename"], item.get("data") or item.get("image") or item.get("url")))
    return found


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    response = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(".")
    if response.get("status") != "COMPLETED":
        raise SystemExit(f"job {response.get('id')} is {response.get('status')}: {response.get('error', '')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in items(response["output"]):
        target = out_dir / Path(name).name
        if data.startswith(("http://", "https://")):
            with urllib.request.urlopen(data, timeout=60) as resp:
                target.write_bytes(resp.read())
        else:
            target.write_bytes(base64.b64decode(data))
        print(f"{target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
