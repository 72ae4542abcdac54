#!/usr/bin/env bash
# GPU check of metacore's fast path: training throughput of the cifar10 and imdb `full` shapes on one GPU.
#
#   bash benchmarks/gpu_check.sh --prepare            # here: copy a data subset and the vocabulary to .gpu_carry/
#   bash benchmarks/gpu_check.sh [--compile] [--out DIR]   # on the GPU machine (reads .gpu_carry/ when present)
#   bash benchmarks/gpu_check.sh --dry [--out DIR]    # any machine: the same code on the CPU at tiny sizes
#
# Needs python3 with torch, transformers, pluggy, pyarrow, pillow (a bare GPU machine of this workplace has them;
# MLflow, gymnasium and stable-baselines3 are not used). Wheels in .whl/ are installed first when present.
# Writes DIR/gpu_check.json (default gpu_check_out/ or $OUT) and prints a table. Budget: under 8 minutes from a
# bare start on one H100/H200 (data decoding ~1 min, BERT-base warm-up, 3 x 5 x 20 timed steps per task).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu_carry

if [[ "${1:-}" == "--prepare" ]]; then
    DATA=${METACORE_DATA_DIR:-../shared/data}
    rm -rf "$CARRY" && mkdir -p "$CARRY/data/cifar10" "$CARRY/data/imdb" "$CARRY/vocab"
    cp "$DATA/cifar10/train-0.parquet" "$DATA/cifar10/train-1.parquet" "$DATA/cifar10/test.parquet" "$CARRY/data/cifar10/"
    cp "$DATA/imdb/train.parquet" "$DATA/imdb/test.parquet" "$CARRY/data/imdb/"
    PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
    VOCAB=$("$PY" -c "from metacore.plugins.imdb import bundled_model_dir; print(bundled_model_dir())")
    for f in vocab.txt tokenizer.json tokenizer_config.json special_tokens_map.json; do
        [[ -f "$VOCAB/$f" ]] && cp "$VOCAB/$f" "$CARRY/vocab/"
    done
    du -sh "$CARRY"
    echo "carry $CARRY (and .whl if any) to the GPU machine; run: bash benchmarks/gpu_check.sh --out \$OUT"
    exit 0
fi

PY=${PYTHON:-python3}
if [[ " $* " == *" --dry "* && -x .venv/bin/python && -z "${PYTHON:-}" ]]; then
    PY=.venv/bin/python
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
ARGS=()
if [[ -d "$CARRY/data" ]]; then ARGS+=(--data-dir "$CARRY/data"); fi
if [[ -d "$CARRY/vocab" ]]; then ARGS+=(--vocab-dir "$CARRY/vocab"); fi
if [[ -n "${OUT:-}" ]]; then ARGS+=(--out "$OUT"); fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" benchmarks/gpu_check.py "${ARGS[@]}" "$@"
