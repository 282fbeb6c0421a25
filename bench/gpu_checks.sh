#!/usr/bin/env bash
# Every GPU check of the kernels issue in one device command (tests marked `gpu`, then the three benchmarks):
#   source .device/setup.sh && bash bench/gpu_checks.sh "$OUT"
# Results land in OUT/<gpu name>/ (JSON and markdown, kernel_targets.md the summary; the peaked-logits loss run in
# OUT/logit_std4/<gpu name>/) and OUT/gpu_tests.txt; commit them under bench/results/.
# Setup once per checkout: the shared folder holds its wheels in wheels/ but setup.sh installs device-wheels/*.whl:
#   mkdir -p .device && cp -r ../shared/device/. .device/ && mv .device/wheels .device/device-wheels
# and `echo /.device/ >> .git/info/exclude`; pass .device in the run's carry.
# Each stage has its own time limit (575 s in all, inside the device's 600 s per command), so that one slow stage
# cannot take the others' results with it; what a stage wrote before its limit stays in OUT.
set -uo pipefail
out=${1:?usage: bench/gpu_checks.sh OUT_FOLDER}
mkdir -p "$out"
status=0
timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider -rA -s tests/test_kernels.py tests/test_attention.py tests/test_ghost.py \
    2>&1 | tee "$out/gpu_tests.txt" || status=1
timeout 45 python3 bench/sm90_compile.py --out "$out/sm90_compile" 2>&1 | tee "$out/sm90_compile.log" || status=1  # the device's triton
for stage in loss_kernel:100 ghost_dot:60 meta_gradient:130; do
    bench=${stage%:*}
    timeout "${stage#*:}" python3 "bench/$bench.py" --out "$out" 2>&1 | tee "$out/$bench.log" || status=1
done
# Peaked logits (std 4, closer to a trained model's softmax): Cut Cross-Entropy skips more blocks there.
timeout 60 python3 bench/loss_kernel.py --logit-std 4 --out "$out/logit_std4" 2>&1 | tee "$out/loss_kernel_std4.log" \
    || status=1
# The targets against what the run measured, one table per GPU (reads the JSON above; about a second).
python3 bench/kernel_targets.py --out "$out" 2>&1 | tee "$out/kernel_targets.log" || status=1
exit $status
