#!/usr/bin/env bash
# One GPU session's checks in one call (docs/benchmarks.md, "GPU measurement"): the decode-step profile, the
# throughput table and the end-to-end run, each under its own time limit, each part's output under $OUT as it ends.
#
#   bash bench/gpu_run.sh                 # on a GPU host with this package installed
#   OUT=/tmp/gpu bash bench/gpu_run.sh    # elsewhere than bench/out/gpu
#
# A host without network: carry the wheels it lacks in .whl/ (this package's own included: `pip wheel --no-deps
# --no-build-isolation -w .whl .`); they are installed into /tmp/site first. Limits: PROFILE_S, TABLE_S, E2E_S (0:
# skip that part); extra arguments: PROFILE_ARGS (e.g. "--model 8b --rows 128"), TABLE_ARGS (e.g. "--models 8b").
set -u
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
} > "$OUT/host.txt" 2>&1
cat "$OUT/host.txt"
started=$SECONDS
# shellcheck disable=SC2086  # the *_ARGS are word lists
if [ "${PROFILE_S:-120}" != 0 ]; then
    timeout "${PROFILE_S:-120}" python3 -P bench/gpu_profile.py ${PROFILE_ARGS:-} > "$OUT/profile.txt" 2>&1
    echo "profile: rc $? after $((SECONDS - started)) s"
    grep -E "^===|failed" "$OUT/profile.txt"
fi
if [ "${TABLE_S:-240}" != 0 ]; then
    timeout "${TABLE_S:-240}" python3 -P bench/gpu.py --skip-cb --budget-s "${TABLE_BUDGET_S:-190}" ${TABLE_ARGS:-} \
        --json "$OUT/gpu.json" > "$OUT/table.txt" 2>&1
    echo "table: rc $? after $((SECONDS - started)) s"
    grep -E "^(8b|1b) |ULD graphs|capture failed|synchronous output" "$OUT/table.txt"
fi
if [ "${E2E_S:-200}" != 0 ]; then
    timeout "${E2E_S:-200}" python3 -P bench/gpu_e2e.py --out "$OUT/e2e" > "$OUT/e2e.txt" 2>&1
    echo "e2e: rc $? after $((SECONDS - started)) s"
    tail -25 "$OUT/e2e.txt"
fi
