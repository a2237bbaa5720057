#!/usr/bin/env bash
# One command for an unattended run of the benchmark suite on a GPU machine that has only torch,
# transformers, timm, numpy, scipy and pillow (no network):
#     bash benchmarks/gpu_suite.sh [OUT_DIR]
# The wheels of benchmarks/gpu_requirements.txt are expected in .whl/ (benchmarks/gpu_wheels.sh
# fetches them); they are installed into /tmp/site, the project runs from this source tree. Writes
# suite-gpu.md, suite-gpu.json and suite-gpu.log to OUT_DIR ($OUT, else ./suite-out).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-suite-out}}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PWD/plugins:$PYTHONPATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
set -o pipefail
python3 benchmarks/suite.py --device cuda --json "$out/suite-gpu.json" --md "$out/suite-gpu.md" "${@:2}" 2>&1 \
    | tee "$out/suite-gpu.log"
