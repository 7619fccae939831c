#!/usr/bin/env bash
# The GPU checks, on a machine with a CUDA device: the cuda tests, then every benchmark with
# --device cuda and the README's default run on the GPU, in float32 and with precision=bf16 (the
# regularizer benchmark too, NHWC). CI has no GPU and never runs this.
#   bash tests/gpu/check.sh [LOG_DIR] [tests|benchmarks|all]
# Each step's full output is in LOG_DIR/<step>.log; a failed step does not stop the later ones, and
# the script exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
logs=${1:-gpu-checks}
what=${2:-all}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
python=${PYTHON:-python}  # the interpreter that has torch and Tulip
failed=0

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout "$limit" "$@" > "$logs/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
    tail -n "${TAIL_LINES:-12}" "$logs/$name.log"
    [ "$rc" -eq 0 ] || failed=1
}

"$python" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name())" || exit 1
if [ "$what" != benchmarks ]; then
    # 400 s: two of the tests compile the step with torch.compile (tens of seconds each)
    step tests 400 "$python" -m pytest -m cuda -q -p no:cacheprovider --durations=8 tests/system/test_cuda.py
fi
if [ "$what" != tests ]; then
    step bench_regularizers 90 "$python" -m tulip.bench regularizers --device cuda --rounds 8
    step bench_regularizers_bf16 90 "$python" -m tulip.bench regularizers --device cuda --rounds 8 \
        --precision bf16 --channels-last
    # the CIFAR-10 study's step (sweeps/paper_cifar10_study.yaml): its GPU-hours per trial
    step bench_resnext_cifar 150 "$python" -m tulip.bench regularizers --device cuda --rounds 5 \
        --model resnext34_2x32 --shape 3,32,32 --only lip+J2
    step bench_attacks 90 "$python" -m tulip.bench attacks --device cuda
    step bench_autoattack 120 "$python" -m tulip.bench attacks --device cuda --attack autoattack_l2 --n 50
    step bench_nn 45 "$python" -m tulip.bench nn --device cuda
    step default_run 120 "$python" run.py device=cuda wandb.mode=disabled hydra.run.dir="$logs/default_run"
    step default_run_bf16 120 "$python" run.py device=cuda precision=bf16 wandb.mode=disabled \
        hydra.run.dir="$logs/default_run_bf16"
fi
exit $failed
