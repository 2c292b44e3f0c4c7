#!/usr/bin/env bash
# Experiment 6 (experiments/pretrain.py) on one GPU within a time limit:
#
#     bash experiments/gpu_pretrain.sh OUT
#
# Runs the pre-registered plan (gate, confirmation, references, diagnostic variants, and the
# 3-seed stage if a chain is ahead) with DRIVERS processes sharing one results folder on the
# GPU (each claims a run with a file lock; a tiny model leaves the GPU idle between kernels, so
# several processes keep it busy). Every driver checkpoints and stops before the limit; what
# has finished (and the curves of what has not, the logs, report.md and the figures) is packed
# into OUT/pretrain_gpu.tgz every 30 s and at the end; OUT/report.md is the report, and
# OUT/warm__s<seed>.pt are the warm starts (13 MB each), which a later run on a fresh machine
# needs to continue the same plan: RESUME_FROM=DIR (a folder holding what OUT got) unpacks
# them first; finished runs are skipped, unfinished ones start again. At most 5 files land in
# OUT. The data is the stdlib of the Python that runs it (its version and file-list hash are in
# every results JSON). Needs torch, transformers, tqdm and matplotlib; no internet.
#
# Environment: PYTHON (python3), TIME_LIMIT (480 s, for the whole script), DRIVERS (8),
# WORK (/tmp/pretrain_gpu), DEVICE (cuda), QUICK (set to 1: the tiny design, a smoke test),
# RESUME_FROM (a folder with an earlier pretrain_gpu.tgz and warm__s*.pt).
set -u
OUT=${1:?usage: bash experiments/gpu_pretrain.sh OUT}
PY=${PYTHON:-python3}
LIMIT=${TIME_LIMIT:-480}
DRIVERS=${DRIVERS:-8}
WORK=${WORK:-/tmp/pretrain_gpu}
DEVICE=${DEVICE:-cuda}
EXTRA=()
if [ "${QUICK:-0}" = 1 ]; then EXTRA=(--quick); fi
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

pack() {  # everything but the checkpoints, atomically; the warm starts beside it
    tar czf "$OUT/.pretrain_gpu.tgz.tmp" -C "$WORK" --exclude=./ckpt . 2>/dev/null &&
        mv "$OUT/.pretrain_gpu.tgz.tmp" "$OUT/pretrain_gpu.tgz"
    for w in "$WORK"/ckpt/warm__s*.pt; do
        [ -f "$w" ] && [ ! -f "$OUT/$(basename "$w")" ] && cp "$w" "$OUT/"
    done
}

if [ -n "${RESUME_FROM:-}" ]; then
    tar xzf "$RESUME_FROM/pretrain_gpu.tgz" -C "$WORK" || exit 1
    mkdir -p "$WORK/ckpt" && cp "$RESUME_FROM"/warm__s*.pt "$WORK/ckpt/" 2>/dev/null
    rm -f "$WORK"/curves/*.jsonl  # unfinished runs start again (no checkpoint travels)
    echo "resumed from $RESUME_FROM: $(ls "$WORK/runs" | wc -l) runs done"
fi

{
    echo "start $(date -u '+%F %T') UTC, limit ${LIMIT}s, ${DRIVERS} drivers, device ${DEVICE}"
    $PY -c 'import platform, torch, transformers; print("python", platform.python_version(),
        "torch", torch.__version__, "transformers", transformers.__version__,
        "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null
} | tee "$WORK/setup.log"

# the budget estimate once (every driver reads it), then the drivers
$PY experiments/pretrain.py "${EXTRA[@]}" --device "$DEVICE" --out "$WORK" --estimate-only \
    --no-progress > "$WORK/estimate.log" 2>&1
grep -E '"(lora_r|chain|full|lora_rL|eval_s|hours_gate_and_confirm|hours_plan_no_chain_ahead|hours_plan_chain_ahead)"' \
    "$WORK/estimate.log"
left=$((LIMIT - ($(date +%s) - start) - 25))  # 25 s for the report and the last pack
pids=()
for i in $(seq 1 "$DRIVERS"); do
    $PY experiments/pretrain.py "${EXTRA[@]}" --device "$DEVICE" --threads 1 --no-progress \
        --time-limit "$left" --stop-margin 8 --out "$WORK" > "$WORK/driver$i.log" 2>&1 &
    pids+=($!)
    sleep 0.5
done
last=$(date +%s)
while kill -0 "${pids[@]}" 2>/dev/null; do  # true while any driver runs
    sleep 3
    if [ $(($(date +%s) - last)) -ge 30 ]; then
        pack
        last=$(date +%s)
        echo "$((last - start)) s: $(ls "$WORK/runs" 2>/dev/null | grep -vc '^warm') runs done"
    fi
done
wait
grep -h "done \|time is up\|Error\|error" "$WORK"/driver*.log | sort | tail -60
$PY experiments/pretrain_report.py --out "$WORK" --plots > "$WORK/report.log" 2>&1 ||
    tail -20 "$WORK/report.log"
cp "$WORK/report.md" "$OUT/" 2>/dev/null
pack
cat "$WORK/report.md" 2>/dev/null
echo "end $(date -u '+%F %T') UTC, $(($(date +%s) - start)) s; results in $OUT/pretrain_gpu.tgz"
