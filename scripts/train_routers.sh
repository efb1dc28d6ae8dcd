#!/usr/bin/env bash
# Train the λ sweep and the ablations of issue 6 for SmolLM2-135M (docs/RESULTS.md, docs/TRAINING.md):
# every run draws the same pool of calibration windows, whose per-chunk sensitivities (OBJECTIVE=linear,
# the default; --sens-cache) or codec noise (OBJECTIVE=mixture; --noise-cache) the first run computes and
# the others reuse (--no-freeze measures its own). Routers go to $OUT (default routers/), logs beside them.
#   scripts/train_routers.sh MODEL CALIB [DEVICE]     DEVICE: cpu (default) or cuda
# Environment: OBJECTIVE (linear), STEPS (linear 1000, mixture 80), POOL (linear 32, mixture 24), LAMBDAS ("0.7 0.9 0.5 0.6 0.8 0.4"), ABLATE (1: no-freeze, share 3,
# share none at λ 0.7), THREADS (2), PYTHON (python3), CACHE (the noise cache file, default $OUT/noise-cache.pt).
set -uo pipefail
cd "$(dirname "$0")/.."
model=$1 calib=$2 device=${3:-cpu}
out=${OUT:-routers}
mkdir -p "$out"
objective=${OBJECTIVE:-linear} threads=${THREADS:-2}
if [ "$objective" = linear ]; then
    steps=${STEPS:-1000} pool=${POOL:-32} batch=16 cache=(--sens-cache "${CACHE:-$out/sens-cache.pt}")
else
    steps=${STEPS:-80} pool=${POOL:-24} batch=2 cache=(--noise-cache "${CACHE:-$out/noise-cache.pt}")
fi
run() { # name, extra options
    local name=$1; shift
    local c=("${cache[@]}")
    case " $* " in *" --no-freeze "*) c[1]=${c[1]%.pt}-nofreeze.pt ;; esac
    ${PYTHON:-python3} train/train_router.py -m "$model" --calib "$calib" --objective "$objective" --steps "$steps" \
        --seq-len 512 --batch "$batch" --seed 0 --pool "$pool" "${c[@]}" --device "$device" -t "$threads" \
        -o "$out/$name.gguf" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? $(grep -E 'expected_bits' "$out/$name.log" | tail -1)"
}
for lam in ${LAMBDAS:-0.7 0.9 0.5 0.6 0.8 0.4}; do
    run "lambda-$lam" --lambda "$lam"
done
if [ "${ABLATE:-1}" = 1 ]; then
    run ablate-nofreeze-0.7 --lambda 0.7 --no-freeze
    run ablate-share3-0.7 --lambda 0.7 --share 3
    run ablate-sharenone-0.7 --lambda 0.7 --share none
fi
