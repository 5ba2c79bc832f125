#!/usr/bin/env bash
# The GPU checks, as one script for a machine with one NVIDIA GPU (the device tool runs it; CI has no GPU):
# the CUDA tests, then the goodput benchmark on the GPU (1 rank, NCCL) and on that machine's CPUs (2 ranks, gloo).
# Packages its image lacks come as wheels in .whl/ (see benchmarks/RESULTS.md for how they were fetched).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/multiprocess/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt" | tail -15
python3 benchmarks/goodput.py --period ${PERIOD:-15} --periods 2 --nproc 1 --override trainer.device=cuda 2>&1 | tee "$OUT/goodput_gpu.txt"
python3 benchmarks/goodput.py --period ${PERIOD:-15} --periods 2 --nproc 2 --override trainer.device=cpu 2>&1 | tee "$OUT/goodput_cpu16.txt"
