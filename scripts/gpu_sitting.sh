#!/usr/bin/env bash
# One GPU sitting on the device machine, in the project root, with .gpu/ from
# scripts/gpu_prepare.sh carried along: installs what the machine lacks, then measures the
# README's GPU rows in order of importance until BUDGET seconds have passed. Each
# benchmarks/gpu.py command writes its raw file under $OUT row by row, so a command cut
# short by the budget still leaves its whole rows. Back on the CPU machine: copy the files
# into benchmarks/results/ and print README's table with `benchmarks/gpu.py --markdown`.
#
#   BUDGET=540 OUT=/tmp/out scripts/gpu_sitting.sh
#   GPU_ARGS="--tiny --steps 2 --warmup 1 --repeats 1" scripts/gpu_sitting.sh   # CPU rehearsal
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${BUDGET:-540}
out=${OUT:-/tmp/gpu-sitting}
started=$(date +%s)
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl &&
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --target /tmp/site2 . || exit 1
export PYTHONPATH=/tmp/site2:/tmp/site PATH=/tmp/site2/bin:$PATH PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 DELTACLI_COMMIT=$(cat .gpu/commit)
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv > "$out/gpu.txt" ||
    echo "no nvidia-smi: not a GPU machine" | tee "$out/gpu.txt"

measure() {  # NAME ARGS...: one gpu.py command within what is left of the budget
    local name=$1 left=$((budget - ($(date +%s) - started)))
    shift
    if [ "$left" -lt 60 ]; then
        echo "skipped $name: ${left}s of the budget left" | tee -a "$out/sitting.log"
        return
    fi
    echo "== $name (${left}s left)" | tee -a "$out/sitting.log"
    # shellcheck disable=SC2086  # GPU_ARGS: words to add to every command
    timeout "$left" python3 benchmarks/gpu.py --tokenizer .gpu/tok --out "$out/gpu-$name.json" \
        "$@" ${GPU_ARGS:-} 2>&1 | tail -n 25 | tee -a "$out/sitting.log"
}

# The LoRA goals first (1.5× PEFT at ≥ 35% MFU on the 1B row, 1.3× on the 828M one), then
# the loss kernels, then the other kinds against their own eager step.
measure lora-828m --rows lora
measure lora-1b-compiled --size 1b --length 2048 --batch 16 --compile --rows lora
measure lora-828m-liger --loss-kernel liger --rows lora
measure qlora-828m --rows "lora, NF4 base (QLoRA)"
kinds="ia3;prefix;prompt;sift 1%;parallel adapter"
measure kinds-828m --repeats 3 --rows "$kinds"
measure kinds-828m-compiled --compile --repeats 3 --rows "$kinds"
echo "done in $(($(date +%s) - started))s" | tee -a "$out/sitting.log"
