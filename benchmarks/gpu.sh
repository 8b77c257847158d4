#!/usr/bin/env bash
# The GPU checks of issue 4 as one prepared script, for a session that is lent a GPU machine.
#
#   bash benchmarks/gpu.sh prepare    # HERE, with network: wheels the GPU machine lacks, into .whl/
#   bash benchmarks/gpu.sh core       # THERE (device tool, carry [".whl"]): CUDA tests + adamw from 1M to 1B
#   bash benchmarks/gpu.sh specs      # THERE, if device time is left: whole iterations, then every
#                                     # elementwise/reduction family at 1e8
#
# The GPU image has Python 3.12 and its own torch, networkx, pyyaml and pytest, but no pydantic: `prepare`
# downloads the versions this checkout is tested with (for CPython 3.12, manylinux x86-64) and builds an
# opdsl wheel, so the machine needs no network. Each stage fits one device call (under 10 minutes) with
# every step under its own timeout, and writes its logs and reports to $OUT (or ./gpu-results): they come
# back even when a step times out.
#
# Python runs with -P there: the checkout's opdsl/ must not shadow the installed wheel, whose opdsl.blocks
# and opdsl.compiled come from blocks/ and compiled/. A dry run on a CPU, in a venv with torch but no
# pydantic or opdsl: GPU_PYTHON_VERSION=3.11 bash benchmarks/gpu.sh prepare, then
# BENCH_DEVICE=cpu BENCH_SIZES=1e5 BENCH_BIG_SIZE=2e5 BENCH_GPT2_SCALE=0.05 BENCH_SPEC_SIZE=1e5 ITER_WIDTH=256 OUT=/tmp/gpu-dry bash benchmarks/gpu.sh core
# (and specs).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-}
out=${OUT:-gpu-results}
device=${BENCH_DEVICE:-cuda}
sizes=${BENCH_SIZES:-1e6 1e7 1e8}            # the dry run on a CPU passes smaller ones
big_size=${BENCH_BIG_SIZE:-1e9}
gpt2_scale=${BENCH_GPT2_SCALE:-1.0}
spec_size=${BENCH_SPEC_SIZE:-1e8}

prepare() {
    local py=${PYTHON:-python3}
    rm -rf .whl && mkdir -p .whl
    local pins
    pins=$("$py" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")))
EOF
) || { echo "prepare: run it in the environment the tests pass in (pydantic installed)"; return 1; }
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $pins || return 1
    "$py" -m pip wheel -q --no-deps -w .whl . || return 1
    ls -1 .whl
    echo "carry .whl in every device call (it is ignored by git: /.whl/ in .gitignore)"
}

install_wheels() {
    [ -d .whl ] || { echo "no .whl/: run 'bash benchmarks/gpu.sh prepare' here first and carry .whl"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 2
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    mkdir -p "$out"
    python3 -P - <<'EOF' 2>&1 | tee "$out/device.txt"
import torch, opdsl
print("torch", torch.__version__, "| opdsl from", opdsl.__file__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
EOF
}

core() {
    install_wheels
    timeout 200 python3 -P -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
    timeout 240 python3 -P benchmarks/step.py --device "$device" --specs adamw --sizes $sizes --gpt2-scale "$gpt2_scale" \
        --out "$out/benchmarks-gpu.md" 2>&1 | tee "$out/benchmarks-gpu.log" | grep -v "^  \["
    # At 1e9 every contender keeps 16 GB of its own: only the three the targets read fit beside each other.
    timeout 150 python3 -P benchmarks/step.py --device "$device" --specs adamw --sizes "$big_size" --gpt2-scale 0 \
        --only "opdsl adamw compiled" "torch fused" same-access \
        --out "$out/benchmarks-gpu-1e9.md" 2>&1 | tee "$out/benchmarks-gpu-1e9.log" | grep -v "^  \["
}

specs() {
    install_wheels
    # Whole iterations: whether keeping gradients as views (zero, then add in place) beats torch's None
    # gradients copied in at the step, where no allocator faults in pages (docs/performance.md, known gaps).
    timeout 60 python3 -P benchmarks/iteration.py --device "$device" --width "${ITER_WIDTH:-4096}" --layers 8 --batch 8 \
        --rounds 20 2>&1 | tee "$out/iteration-gpu.md"
    # One process for all (a fresh one per spec pays torch.compile's start-up each time); only the rows the
    # GPU targets read: opdsl compiled with and without the check, torch fused, and the same-access stream.
    timeout 500 python3 -P benchmarks/step.py --device "$device" --one-process --sizes "$spec_size" --gpt2-scale 0 --repeats 10 \
        --specs adam lion signum scgadam rmsprop scsadamw adagrad-norm adamw-sn adagrad-sn coba sgdol \
        --only compiled "torch fused" same-access \
        --out "$out/benchmarks-gpu-specs.md" 2>&1 | tee "$out/benchmarks-gpu-specs.log" | grep -v "^  \["
}

case "$stage" in
    prepare) prepare ;;
    core) core ;;
    specs) specs ;;
    *) echo "usage: bash benchmarks/gpu.sh prepare|core|specs"; exit 2 ;;
esac
