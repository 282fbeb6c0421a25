#!/usr/bin/env bash
# The end-to-end comparison (bench/end_to_end.py: TRL + Liger on DeepSpeed against adapt_fast, Llama-3.2-1B shape,
# bf16) in one device command of under ten minutes:
#   source .device/setup.sh && bash bench/gpu_end_to_end.sh "$OUT"
# Everything lands in one file, OUT/gpu_end_to_end.tar.gz (bench/stages.sh says why); commit it with
#   tar -xzf gpu_end_to_end.tar.gz -C bench/results
# which gives bench/results/<gpu>/{layer_kernels,end_to_end}.{json,md} and logs/.
# The GPU machine has neither TRL nor accelerate and no package index: once per checkout, beside the other wheels
# (see bench/gpu_checks.sh for the .device folder), on this machine:
#   .venv/bin/pip download --no-deps --dest .device/device-wheels trl==1.16.0 accelerate==1.15.0
set -uo pipefail
out=${1:?usage: bench/gpu_end_to_end.sh OUT_FOLDER}
python3 -c "import trl, accelerate" || { echo "gpu_end_to_end: TRL or accelerate missing (see the header)" >&2; exit 2; }
source "$(dirname "$0")/stages.sh"
stages_begin "$out" gpu_end_to_end "${GPU_END_TO_END_BUDGET_S:-580}" || exit 2
# The layer kernels against HF's and Liger-Kernel's, one by one (bench/layer_kernels.py, about 20 s).
stage 45 logs/layer_kernels.log python3 bench/layer_kernels.py --out "$work"
# end_to_end.py writes its results after every stack, packed every 30 s: a run cut short keeps them. Ours first,
# then TRL's padding-free packed run (the one expected to be its fastest), so that a cut-short run compares them.
stage 520 logs/end_to_end.log python3 bench/end_to_end.py --out "$work" --stack-timeout 110 \
    --stacks uniform,trl_packed,adapt,trl,trl_grouped,adapt_folded,uniform_unfused
cp "$work/$gpu/end_to_end.md" "$out/" 2>/dev/null
stages_end
