#!/usr/bin/env bash
# The runs of benchmarks/gpu_steps.py behind the README's GPU table, in order of importance, inside one
# time budget (a lent GPU is held for minutes, so the most important figures come first):
#
#   main     DPO (8, 16 pairs) and guided sampling (8, 16 images), full fine-tuning: the target rows
#   lora     DPO and sampling at 8 with LoRA rank 8, each against eager LoRA, the set-up of the
#            diffusers DPO script users run (its backward skips the frozen weights' gradients: 41
#            TFLOP a step against 52); the sampling through the adapters merged into the weights
#   train    the policy-gradient and DRaFT training steps (8 images)
#   cudnn    DPO and sampling at 8 with the cuDNN attention kernel (the one lever swept here)
#   lora-merged  sampling at 8 through LoRA rank 8 merged into the weights, no other lever, against
#            eager LoRA: what merging the adapters for rollouts saves (online DPO, SPIN, DiffusionNFT)
#   graphs   DPO (8) and sampling (8, 16) with CUDA graphs (compile mode reduce-overhead)
#
# Each run is its own process, against its own eager baseline measured in that process; each writes
# OUT/NAME/results.json after every step it measures, so a run stopped by its time limit keeps what
# it measured. Inductor's cache is shared, so later runs reuse the graphs earlier runs compiled.
#
#   benchmarks/gpu_steps_suite.sh OUT [SECONDS]                    # on CUDA, 1800 s in all by default
#   benchmarks/gpu_steps_suite.sh OUT 120 --device cpu --tiny      # a rehearsal on the CPU
#   RUNS="lora graphs" benchmarks/gpu_steps_suite.sh OUT 560       # only the runs named, in that order
#
# Arguments after SECONDS are passed to every run. Prints each run's table, then all of them in one
# (OUT/table.md, benchmarks/gpu_steps_table.py); OUT/log.txt has it all.
# Measured on one H200 (torch 2.11, docs/scaling.md): on a bare machine, compiling the DPO step at 8
# pairs took 152 s and the suite's first run did not finish in 300 s; with inductor's cache warm a run's
# compiling took 7 to 27 s. The limits below leave room for a cold cache.
set -u
out=${1:?usage: gpu_steps_suite.sh OUT [SECONDS] [gpu_steps.py arguments]}
budget=${2:-1800}
shift $(($# >= 2 ? 2 : 1))
extra=("$@")
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1

run() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - ($(date +%s) - start)))
    if ((left < 30)); then
        echo "=== $name skipped: ${left} s of the budget left"
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$python" "$here/gpu_steps.py" --out "$out/$name" "$@" "${extra[@]}"
    echo "=== $name exit $? at $(($(date +%s) - start)) s"
}

# The runs, by name: each a time limit (seconds) and gpu_steps.py's arguments.
declare -A limits=([main]=600 [lora]=420 [train]=180 [cudnn]=240 [lora-merged]=120 [graphs]=300)
declare -A arguments=(
    [main]="--steps dpo,sample --pairs 8,16 --batch 8,16"
    [lora]="--steps dpo,sample --pairs 8 --batch 8 --finetune lora --lora-rank 8 --merge-lora"
    [train]="--steps pg,draft --batch 8"
    [cudnn]="--steps dpo,sample --pairs 8 --batch 8 --sdpa cudnn"
    [lora-merged]="--steps sample --batch 8 --finetune lora --lora-rank 8 --merge-lora --compile none
        --no-channels-last --no-tf32"
    [graphs]="--steps dpo,sample --pairs 8 --batch 8,16 --compile reduce-overhead"
)
order=(${RUNS:-main lora train cudnn lora-merged graphs})
for name in "${order[@]}"; do
    if [[ -z ${limits[$name]:-} ]]; then
        echo "gpu_steps_suite.sh: RUNS names $name; the runs are: main lora train cudnn lora-merged graphs" >&2
        exit 2
    fi
done
mkdir -p "$out"
start=$(date +%s)

{
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    "$python" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
    for name in "${order[@]}"; do
        # shellcheck disable=SC2086  # the arguments are words
        run "$name" "${limits[$name]}" ${arguments[$name]}
    done
    echo "=== done at $(($(date +%s) - start)) s"
    results=("$out"/*/results.json)
    if [[ -e ${results[0]} ]]; then
        "$python" "$here/gpu_steps_table.py" "${results[@]}" | tee "$out/table.md"
    fi
} 2>&1 | tee "$out/log.txt"
