#!/usr/bin/env bash
# The end-to-end comparison (bench/end_to_end.py: TRL + Liger on DeepSpeed against adapt_fast, Llama-3.2-1B shape,
# bf16) in one device command of about five minutes:
#   source .device/setup.sh && bash bench/gpu_end_to_end.sh "$OUT"
# Results land in OUT/<gpu name>/{layer_kernels,end_to_end}.{json,md} and OUT/*.log; commit them under bench/results/.
# The GPU machine has neither TRL nor accelerate and no package index: once per checkout, beside the other wheels
# (see bench/gpu_checks.sh for the .device folder), on this machine:
#   .venv/bin/pip download --no-deps --dest .device/device-wheels trl==1.16.0 accelerate==1.15.0
set -uo pipefail
out=${1:?usage: bench/gpu_end_to_end.sh OUT_FOLDER}
mkdir -p "$out"
python3 -c "import trl, accelerate" || { echo "gpu_end_to_end: TRL or accelerate missing (see the header)" >&2; exit 2; }
# The layer kernels against HF's and Liger-Kernel's, one by one (bench/layer_kernels.py, about 20 s).
timeout 45 python3 bench/layer_kernels.py --out "$out" 2>&1 | tee "$out/layer_kernels.log"
# Results are written after every stack (ours first): a run cut short by the limit keeps what it measured.
timeout 520 python3 bench/end_to_end.py --out "$out" --stack-timeout 110 \
    --stacks uniform,adapt,trl,trl_grouped,trl_packed,adapt_folded,uniform_unfused 2>&1 | tee "$out/end_to_end.log"
