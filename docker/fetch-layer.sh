#!/bin/sh
# One model stage of the generated Dockerfile (scripts/model_layers.py): fetch the entries of MANIFEST into
# MODELS_DIR, verified, and write their record; then set every timestamp to 0, so that the same entries give
# the same bytes -- and the same layer digest -- even when the stage has to run again.
#   fetch-layer.sh MANIFEST MODELS_DIR RECORD
set -eu
manifest="$1" models="$2" record="$3"
if [ -z "${HF_ENDPOINT:-}" ]; then unset HF_ENDPOINT; fi
if [ -z "${CIVITAI_ENDPOINT:-}" ]; then unset CIVITAI_ENDPOINT; fi
mkdir -p "$models" "$(dirname "$record")"
/opt/venv/tools/bin/python /opt/build/scripts/fetch_models.py \
    --manifest "$manifest" --models-dir "$models" --record "$record" --progress lines
find "$models" -exec touch -h -d @0 {} +
