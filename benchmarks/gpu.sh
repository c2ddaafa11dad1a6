#!/usr/bin/env bash
# The GPU checks in one command, finished within BUDGET_S seconds (default 480: 8 minutes on one H200).
#
#   bash benchmarks/gpu.sh OUT_DIR             # set up if needed, then the checks below; results under OUT_DIR
#   bash benchmarks/gpu.sh --dry-run OUT_DIR   # print the plan (commands and time limits); run and write nothing
#
# Steps, in order, each under `timeout` (its cap, or the time left if less; the last steps are cut first):
#   setup          make .venv/.installed (skipped when the venv exists or PY is given)
#   env            torch, CUDA and the GPU's name -> OUT_DIR/env.json; stops here without CUDA
#   speed          benchmarks/speed.py --device cuda: looped, batched, higher, plain loop, PGD-AT, bf16 attacks,
#                  reuse, PGD throughput, scaling -> OUT_DIR/speed_cuda.json
#   pytest_gpu     pytest -m gpu (the CUDA-only tests) -> OUT_DIR/pytest_gpu.xml
#   compile_calls  speed.py --only compile: attack calls eager vs compile vs cudagraphs, PGD-5/10 on 64 and 512
#                  examples, with compilation times -> OUT_DIR/speed_cuda_compile_calls.json
#   compile_steps  speed.py --only peers --compile: the meta-step and its peers beside compiled and CUDA-graph
#                  attacks -> OUT_DIR/speed_cuda_compile_steps.json
#   op_count       benchmarks/op_count.py (counted on CPU; --hidden 8 gives the same counts) -> OUT_DIR/ops.json
# speed.py writes its JSON after each section, so a step cut short keeps the sections it finished. Inductor's
# caches start empty in a temporary directory (compilation times are cold) shared by the steps.
# Every step's output is in OUT_DIR/<step>.log and its exit status and seconds in OUT_DIR/steps.json (124: timed out).
#
# Environment:
#   TORCH_SPEC  the torch requirement `make` installs (default: the Makefile's, torch==2.13.0, which is a CPU
#               wheel on the machines this project is built on). The GPU machine may have no internet: it needs
#               a CUDA build of torch from the package registry it can reach (point pip at it with PIP_INDEX_URL
#               or PIP_EXTRA_INDEX_URL, or give TORCH_SPEC a wheel file), or an interpreter that has one (PY).
#   PY          a Python with a CUDA torch and this project's dependencies: skips the set-up.
#   BUDGET_S    the whole run's time limit in seconds (default 480).
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu.sh [--dry-run] OUT_DIR" >&2
    exit 64
fi
OUT="$(realpath -m "$1")"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUDGET_S="${BUDGET_S:-480}"
START=$SECONDS
STEPS_JSON=""
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# run NAME CAP_S CMD...: CMD under `timeout`, output to OUT/NAME.log, status recorded; returns CMD's status.
run() {
    local name="$1" cap="$2"
    shift 2
    local left=$((BUDGET_S - (SECONDS - START) - 5))
    local limit=$((cap < left ? cap : left))
    if [[ $DRY -eq 1 ]]; then
        echo "[$name] timeout --kill-after=5 ${cap}s $*${DRY_NOTE:+  ($DRY_NOTE)}"
        return 0
    fi
    if ((limit < 10)); then
        echo "[$name] skipped: ${left}s left of the ${BUDGET_S}s budget"
        STEPS_JSON+="${STEPS_JSON:+,}{\"step\": \"$name\", \"rc\": null, \"skipped\": true}"
        return 1
    fi
    echo "[$name] (limit ${limit}s) $*"
    local t0=$SECONDS rc=0
    timeout --kill-after=5 "${limit}s" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    echo "[$name] exit $rc after $((SECONDS - t0))s"
    STEPS_JSON+="${STEPS_JSON:+,}{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit_s\": $limit}"
    return $rc
}

finish() {
    [[ $DRY -eq 1 ]] && return
    echo "{\"budget_s\": $BUDGET_S, \"seconds\": $((SECONDS - START)), \"steps\": [$STEPS_JSON]}" >"$OUT/steps.json"
    echo "wrote $OUT/steps.json ($((SECONDS - START))s)"
}
trap finish EXIT

[[ $DRY -eq 1 ]] || mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/metaadv_gpu_sh_inductor_$$}"
SKIP=""
if [[ -n "${PY:-}" ]]; then
    SKIP="skipped: PY=$PY"
elif [[ -f .venv/.installed ]]; then
    SKIP="skipped: .venv/.installed exists"
fi
PY="${PY:-.venv/bin/python}"
if [[ -z "$SKIP" || $DRY -eq 1 ]]; then
    DRY_NOTE="$SKIP" run setup 240 make .venv/.installed ${TORCH_SPEC:+TORCH_SPEC="$TORCH_SPEC"} || exit 1
else
    echo "[setup] $SKIP"
fi

ENV_CHECK='import json, sys, torch
ok = torch.cuda.is_available()
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": ok,
        "gpu": torch.cuda.get_device_name(0) if ok else None}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
sys.exit(0 if ok else "no CUDA device visible to this torch: install a CUDA build (TORCH_SPEC, PY; see the header)")'
run env 60 "$PY" -c "$ENV_CHECK" "$OUT/env.json" || exit 2

run speed 120 "$PY" benchmarks/speed.py --device cuda --out "$OUT/speed_cuda.json"
run pytest_gpu 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml"
run compile_calls 120 "$PY" benchmarks/speed.py --device cuda --only compile --out "$OUT/speed_cuda_compile_calls.json"
run compile_steps 120 "$PY" benchmarks/speed.py --device cuda --only peers --compile \
    --out "$OUT/speed_cuda_compile_steps.json"
run op_count 60 "$PY" benchmarks/op_count.py --hidden 8 --tasks 1 8 --json "$OUT/ops.json"
exit 0
