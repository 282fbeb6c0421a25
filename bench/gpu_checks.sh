#!/usr/bin/env bash
# Every GPU check of the kernels issue in one device command (tests marked `gpu`, then the benchmarks, then a summary):
#   source .device/setup.sh && bash bench/gpu_checks.sh "$OUT"
# Everything lands in one file, OUT/gpu_checks.tar.gz (bench/stages.sh says why); commit it with
#   tar -xzf gpu_checks.tar.gz -C bench/results
# which gives bench/results/<gpu>/: gpu_tests.txt, triton_tests_on_gpu.txt, sm90_compile.{json,md},
# {loss_kernel,ghost_dot,meta_gradient,loss_kernel_sweep}.{json,md}, kernel_targets.{json,md} (the summary) and logs/;
# and bench/results/logit_std4/<gpu>/ (the peaked-logits loss run). kernel_targets.md is also left beside the archive,
# and printed last.
# Setup once per checkout: the shared folder holds its wheels in wheels/ but setup.sh installs device-wheels/*.whl:
#   mkdir -p .device && cp -r ../shared/device/. .device/ && mv .device/wheels .device/device-wheels
# and `echo /.device/ >> .git/info/exclude`; pass .device in the run's carry.
# Each stage has its own time limit, and all end within 565 s of the command's start (setup.sh included; the summary,
# and a stage's 10 s to die after its limit, fit in the device's 600 s), so that one slow stage cannot take the
# others' results with it.
set -uo pipefail
out=${1:?usage: bench/gpu_checks.sh OUT_FOLDER}
source "$(dirname "$0")/stages.sh"
stages_begin "$out" gpu_checks "${GPU_CHECKS_BUDGET_S:-565}" || exit 2
# Small tests first, the full-size kernel tests next, the trainer on CUDA (the slowest, last in test_kernels.py) last.
stage 210 gpu_tests.txt python3 -m pytest -v -m gpu -p no:cacheprovider -rA -s --durations=0 \
    tests/test_attention.py tests/test_ghost.py tests/test_kernels.py
stage 100 logs/loss_kernel.log python3 bench/loss_kernel.py --out "$work"
stage 75 logs/ghost_dot.log python3 bench/ghost_dot.py --out "$work"
stage 130 logs/meta_gradient.log python3 bench/meta_gradient.py --out "$work"
# The CPU suite's Triton kernel tests (odd sizes from T=1, empty tasks, split d hidden, tied and strided heads, the
# kernels inside the tiny models) on CUDA, at the CUDA tiles: `make test` runs them interpreted. Not without a GPU.
if [ "$gpu" != cpu ]; then
    stage 90 triton_tests_on_gpu.txt python3 -m pytest -v -m "triton and not gpu" -p no:cacheprovider -rA \
        --durations=10 tests/test_kernels.py
fi
# The device's triton compiling every kernel for sm_90 (the same compiler as sm90_compile_triton3.6.md: a check).
stage 60 logs/sm90_compile.log python3 bench/sm90_compile.py --out "$work/$gpu/sm90_compile"
# Peaked logits (std 4, closer to a trained model's softmax): Cut Cross-Entropy skips more blocks there.
stage 60 logs/loss_kernel_std4.log python3 bench/loss_kernel.py --logit-std 4 --out "$work/logit_std4"
# Last, the first to give way to the deadline: the loss layer's GEMM kernels at other tiles (loss_kernel_sweep.*).
stage 60 logs/loss_kernel_sweep.log python3 bench/loss_kernel.py --sweep --out "$work"
# The issue's targets against what the run measured (reads the JSON above; about a second, so past the deadline too).
stages_deadline=$((SECONDS + 15))
stage 15 logs/kernel_targets.log python3 bench/kernel_targets.py --out "$work"
cp "$work/$gpu/kernel_targets.md" "$out/" 2>/dev/null
stages_end
