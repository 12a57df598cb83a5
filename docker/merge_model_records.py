"""Merge the per-layer model records of the generated Dockerfile's stages (fetch_models.py --record) into one,
in the manifest's order: the stage names, given in that order (each stage writes RECORDS_DIR/<stage>.json).

    merge_model_records.py RECORDS_DIR OUT [STAGE ...]
"""

import json
import sys
from pathlib import Path


def main(records_dir: str, out: str, *stages: str) -> None:
    files = [Path(records_dir) / f"{stage}.json" for stage in stages]
    models = [m for f in files for m in json.loads(f.read_text())["models"]]
    Path(out).write_text(json.dumps({"models": models}, indent=1) + "\n")
    print(f">> models record: {len(models)} model(s) from {len(files)} layer(s)")


if __name__ == "__main__":
    main(*sys.argv[1:])
