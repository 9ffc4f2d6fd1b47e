#!/usr/bin/env bash
# Trial packs on one GPU, in one prepared run of at most 8 minutes (benchmarks/README.md, "Trial packs"):
#   1. graph check: the captured CUDA-graph step against the eager step from the same state (graph_check.py);
#   2. `harness bench` at pack 1, 4, 16 and 64, batch 128, CUDA graph on, and pack 16 with --no-cuda-graph;
#   3. a paper-scale trial (5,000 steps at batch 128, evaluated every 1,000) at pack 1 and pack 16
#      (pack_trial.py: `train_pack` as a sweep's pack trains, without MLflow).
# Each piece runs under `timeout`, capped by what is left of the whole run's budget; a piece that fails or
# times out is recorded and the others still run; the exit status is 1 if any failed.
#
# Usage, from anywhere:
#   benchmarks/gpu_check.sh [--device cuda|cpu|...] [--quick] [--budget SECONDS] [OUT_DIR]
#   benchmarks/gpu_check.sh --fetch-wheels    # here (with pip): .whl/ holds what the GPU machine lacks
# OUT_DIR defaults to $OUT (the device machine's result folder), else gpu-check-results/ in the repo. It gets
# results.jsonl (one line per piece: {"check", "rc", "seconds", "result"}) and log.txt (every piece's stderr).
# --quick: a few steps of everything at small batches, to check the plumbing (on a CPU: --device cpu --quick;
# there the budget is 30 minutes and each timeout 5 times longer, as Python starts slowly on a shared CPU).
#
# The GPU image has torch, numpy, scipy, scikit-image, torchvision, pyyaml, click and rich, not pydantic: run
# --fetch-wheels here first, then carry .whl (ignored by git). With the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
WHEELS="$ROOT/.whl"
DEVICE=cuda
QUICK=0
BUDGET=450 # seconds for everything after the wheels are installed: 7.5 minutes
OUT_DIR=${OUT:-$ROOT/gpu-check-results}
if [[ -x "$ROOT/.venv/bin/python" ]]; then PY=${PYTHON:-$ROOT/.venv/bin/python}; else PY=${PYTHON:-python3}; fi

fetch_wheels() {
  # The versions this checkout's venv holds, built for the GPU image's CPython 3.12 on x86-64 Linux.
  local names=(pydantic pydantic_core annotated_types typing_inspection typing_extensions)
  local specs=() name version
  for name in "${names[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    specs+=("$name==$version")
  done
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${specs[@]}"
  ls -l "$WHEELS"
}

while (($#)); do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; BUDGET=${BUDGET_SET:-1800}; shift ;;
    --budget) BUDGET=$2; BUDGET_SET=$2; shift 2 ;;
    --fetch-wheels) fetch_wheels; exit 0 ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) OUT_DIR=$1; shift ;;
  esac
done

mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/results.jsonl"
LOG="$OUT_DIR/log.txt"
: >"$RESULTS"
: >"$LOG"
log() { echo "[$(date +%T)] $*"; }

if ! "$PY" -c "import pydantic" 2>/dev/null && compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=/tmp/gpu-check-site
  log "installing $(ls "$WHEELS" | wc -l) carried wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import torch, pydantic, yaml, scipy, skimage, torchvision, click, rich" 2>>"$LOG"; then
  echo "missing Python packages (see $LOG): run benchmarks/gpu_check.sh --fetch-wheels here and carry .whl" >&2
  exit 1
fi

CAP_SCALE=1 # each piece's timeout, times this: --quick on a shared CPU starts Python slowly
if ((QUICK)) && [[ $DEVICE == cpu ]]; then CAP_SCALE=5; fi
DEADLINE=$((SECONDS + BUDGET))
FAILED=()

# piece NAME CAP_SECONDS COMMAND...: run under timeout (CAP, or what is left of the budget), append its last
# stdout line (a JSON object) to results.jsonl, its stderr to log.txt.
piece() {
  local name=$1 cap=$(($2 * CAP_SCALE)) left rc=0 started line
  shift 2
  left=$((DEADLINE - SECONDS))
  ((cap < left)) || cap=$left
  if ((cap < 15)); then
    log "skip $name: the budget is spent"
    printf '{"check": "%s", "rc": null, "seconds": 0, "result": null}\n' "$name" >>"$RESULTS"
    FAILED+=("$name:skipped")
    return 0
  fi
  log "$name (timeout ${cap}s): ${*:2:12}"
  echo "=== $name: $*" >>"$LOG"
  started=$SECONDS
  timeout --kill-after=10 "$cap" "$@" >"$OUT_DIR/.stdout" 2>>"$LOG" || rc=$?
  line=$(grep '^{' "$OUT_DIR/.stdout" | tail -n 1 || true)
  rm -f "$OUT_DIR/.stdout"
  printf '{"check": "%s", "rc": %d, "seconds": %d, "result": %s}\n' \
    "$name" "$rc" $((SECONDS - started)) "${line:-null}" >>"$RESULTS"
  if ((rc == 0)); then log "  $line"; else log "  FAILED rc=$rc (124: timed out)"; FAILED+=("$name:$rc"); fi
}

ENV_PY='import json, torch; c = torch.cuda.is_available(); print(json.dumps({"torch": torch.__version__,
  "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if c else None, "threads": torch.get_num_threads()}))'
piece env 60 "$PY" -c "$ENV_PY"

if ((QUICK)); then
  BATCH=32 BENCH_STEPS=5 PACKS=(1 2) GRAPH_PACK=2 NO_GRAPH_PACK=2
  TRIAL=(--steps 20 --eval-every 10 --log-every 5) TRIAL_PACKS=(1 2) GRAPH_STEPS=5
else
  BATCH=128 BENCH_STEPS=100 PACKS=(1 4 16 64) GRAPH_PACK=4 NO_GRAPH_PACK=16
  TRIAL=(--steps 5000 --eval-every 1000 --log-every 25) TRIAL_PACKS=(1 16) GRAPH_STEPS=12
fi

piece "graph-check-p$GRAPH_PACK" 60 "$PY" benchmarks/graph_check.py --pack "$GRAPH_PACK" --steps "$GRAPH_STEPS" \
  --batch-size "$BATCH" --device "$DEVICE"
for pack in "${PACKS[@]}"; do
  piece "bench-p$pack" 60 "$PY" -m harness.cli bench --pack "$pack" --batch-size "$BATCH" --steps "$BENCH_STEPS" \
    --device "$DEVICE"
  if ((pack == NO_GRAPH_PACK)); then
    piece "bench-p$pack-no-graph" 60 "$PY" -m harness.cli bench --pack "$pack" --batch-size "$BATCH" \
      --steps "$BENCH_STEPS" --device "$DEVICE" --no-cuda-graph
  fi
done
for pack in "${TRIAL_PACKS[@]}"; do
  piece "trial-p$pack" 200 "$PY" benchmarks/pack_trial.py --pack "$pack" --batch-size "$BATCH" "${TRIAL[@]}" \
    --device "$DEVICE"
done

log "results: $RESULTS"
if ((${#FAILED[@]})); then
  log "failed: ${FAILED[*]}"
  exit 1
fi
log "all pieces passed"
