#!/usr/bin/env bash
# Issue 19's GPU run, in one call of the device tool (after `bash bench/gpu_wheels.sh` here):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# 1. tests/test_cuda_kernels.py: each packed-row attention backend's loss and gradients against every
#    example alone, and the fused losses against the chunked one;
# 2. bench/gpu_speed.py at 512 and 2,048 tokens, each table printed as its length finishes.
# Everything it writes lands in $OUT (the device tool brings that folder back).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, transformers, peft, trl; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__)' | tee -a "$OUT/gpu.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider -o addopts="" -ra tests/test_cuda_kernels.py 2>&1 \
    | tee "$OUT/cuda_tests.log" | tail -25
timeout "${GPU_SPEED_SECONDS:-420}" python3 bench/gpu_speed.py --base .whl/smollm2 --results "$OUT/RESULTS.md" \
    2>&1 | tee "$OUT/gpu_speed.log" | tail -60
tar czf "$OUT/child_logs.tgz" bench/_work/gpu_speed/*/*/child.log 2>/dev/null
echo "done"
