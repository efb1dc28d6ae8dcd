#!/usr/bin/env bash
# scripts/cuda-check.sh — the GPU run of issue 7, on the device machine (an H100): build with
# MOQAE_CUDA=ON for sm_90, check the GPU against the CPU on SmolLM2 (tests/tools/cuda-parity.c),
# time SmolLM2 pp512/tg128, write the LLaMA-2-7B-shaped Q4_0 model and time decode at depth.
#   scripts/cuda-check.sh [STAGE ...]    stages: build smol parity smolbench make7b 7b32k 7b128k fp16 nofit
# Logs go to $OUT (default /tmp/cuda-out); the summary is printed last. SmolLM2 comes from
# $HOME/stash/smol.part0 + split/smol.part1 (the device machine has no network; see docs/RESULTS.md).
set -uo pipefail
OUT=${OUT:-/tmp/cuda-out}
mkdir -p "$OUT"
B=build-gpu
SMOL=/tmp/smol.gguf
L7=/tmp/llama7b-q4_0.gguf
S="$OUT/summary.md"
note() { echo "$*" | tee -a "$S"; }

# peak device memory while a command runs (nvidia-smi every 100 ms)
with_mem() {
    local tag=$1; shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/mem-$tag.txt" 2>/dev/null &
    local mp=$!
    "$@"
    local rc=$?
    kill "$mp" 2>/dev/null; wait "$mp" 2>/dev/null
    note "peak GPU memory ($tag): $(sort -n "$OUT/mem-$tag.txt" | tail -1) MiB (nvidia-smi, whole device)"
    return $rc
}

stages=${*:-build smol parity smolbench make7b 7b32k}
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$S"
for st in $stages; do
    note "## $st ($(date +%T))"
    case $st in
    build)
        t0=$(date +%s)
        { cmake -S . -B $B -DMOQAE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DMOQAE_BUILD_TESTS=ON &&
          cmake --build $B -j16; } > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
        note "built in $(( $(date +%s) - t0 )) s" ;;
    smol)
        [ -f $SMOL ] || cat "$HOME/stash/smol.part0" split/smol.part1 > $SMOL
        note "smol sha256 $(sha256sum $SMOL | cut -c1-8) (want b179c952)" ;;
    tiny) # a synthetic model (GQA 2, Q4_1, head_dim 64) when SmolLM2 is not on the machine
        pip install -q --no-index --no-deps --target /tmp/site split/gguf-0.19.0-py3-none-any.whl
        PYTHONPATH=/tmp/site python3 models/make_tiny.py -o /tmp/tiny.gguf --vocab bytes --wtype q4_1 --n-embd 256 \
            --n-layer 4 --n-head 4 --n-head-kv 2 --n-ff 512 --n-ctx 2048 > /dev/null
        $B/cuda-parity /tmp/tiny.gguf > "$OUT/parity-tiny.log" 2>&1; grep -E "^kv|^greedy" "$OUT/parity-tiny.log" | tee -a "$S"
        note "parity tiny: $(tail -1 "$OUT/parity-tiny.log")" ;;
    stash)
        mkdir -p "$HOME/stash" && cp split/smol.part0 "$HOME/stash/" && note "stashed part0" ;;
    parity)
        $B/cuda-parity $SMOL > "$OUT/parity.log" 2>&1; grep -E "^kv|^greedy|^codec bytes|^model" "$OUT/parity.log" | tee -a "$S"
        note "parity SmolLM2: $(tail -1 "$OUT/parity.log")" ;;
    ppl) # perplexity on the repository's wikitext excerpt, GPU; the CPU figures come from the same command with -ngl 0
        for kv in fp16 int8 int4 int2; do
            echo -n "ppl -ngl 99 --kv $kv: " | tee -a "$S"
            $B/moqae-perplexity -m $SMOL -f tests/data/wikitext-2-excerpt.txt -c 512 -ngl 99 --kv $kv 2>&1 | grep Final | tee -a "$S"
        done ;;
    smolbench)
        for kv in fp16 int4; do
            with_mem smol-$kv $B/moqae-bench -m $SMOL -ngl 99 -p 512 -n 128 -r 5 --kv $kv 2>&1 | tee -a "$S"
        done
        note "without the decode graph (MOQAE_CUDA_NO_GRAPH=1):"
        MOQAE_CUDA_NO_GRAPH=1 $B/moqae-bench -m $SMOL -ngl 99 -p 0 -n 128 -r 5 --kv fp16 2>&1 | grep tg128 | tee -a "$S" ;;
    make7b)
        [ -f $L7 ] || { pip install -q --no-index --no-deps --target /tmp/site split/gguf-0.19.0-py3-none-any.whl;
                         PYTHONPATH=/tmp/site python3 models/make_llama7b.py -o $L7 2>&1 | tee -a "$S"; } ;;
    7b32k)
        with_mem 7b-int4-32k $B/moqae-bench -m $L7 -ngl 99 -c 131072 --depth 32768 -n 32 -r 3 --kv int4 -v 2>&1 |
            grep -v "^debug" | tee -a "$S" ;;
    7b128k)
        with_mem 7b-int4-128k $B/moqae-bench -m $L7 -ngl 99 -c 131072 --depth 130944 -n 32 -r 3 --kv int4 -v 2>&1 |
            grep -v "^debug" | tee -a "$S" ;;
    fp16)
        with_mem 7b-fp16-32k $B/moqae-bench -m $L7 -ngl 99 -c 32896 --depth 32768 -n 32 -r 3 --kv fp16 -v 2>&1 |
            grep -v "^debug" | tee -a "$S" ;;
    nofit) # FP16 KV at 128k: 64 GiB of ring, fits an 80 GB H100 but not a 24 GiB card; 256k fits nothing
        MOQAE_CUDA_MEMORY_LIMIT=24G $B/moqae-bench -m $L7 -ngl 99 -c 131072 --depth 130944 -n 32 -r 3 --kv fp16 2>&1 |
            tail -2 | tee -a "$S"
        $B/moqae-bench -m $L7 -ngl 99 -c 262144 --depth 262016 -n 32 -r 3 --kv fp16 2>&1 | tail -2 | tee -a "$S" ;;
    7bprobe) # decode at depth 0 (weights only): integer mat-vec (default) against the f32 one; prefill
        $B/moqae-bench -m $L7 -ngl 99 -p 512 -n 32 -r 3 --kv int4 2>&1 | grep -E "pp512|tg32" | tee -a "$S"
        MOQAE_CUDA_MMV=1 $B/moqae-bench -m $L7 -ngl 99 -p 0 -n 32 -r 3 --kv int4 2>&1 | grep tg32 |
            sed 's/$/ (MOQAE_CUDA_MMV=1: f32 mat-vec)/' | tee -a "$S"
        MOQAE_CUDA_NO_GRAPH=1 $B/moqae-bench -m $L7 -ngl 99 -p 0 -n 32 -r 3 --kv int4 2>&1 | grep tg32 |
            sed 's/$/ (no graph)/' | tee -a "$S" ;;
    ncu)
        for k in attn_dec_kernel:2 mmvq_kernel:7; do
            timeout 60 ncu --kernel-name regex:"${k%%:*}" --launch-count "${k##*:}" --section SpeedOfLight \
                $B/moqae-bench -m $L7 -ngl 99 --depth 4096 -n 2 -r 1 --kv int4 >> "$OUT/ncu.txt" 2>&1
        done
        grep -E "^  [a-z_]+kernel|Duration|DRAM Throughput|L1/TEX Cache|Compute \(SM\) Throughput" "$OUT/ncu.txt" |
            head -60 | tee -a "$S" ;;
    *) note "unknown stage $st" ;;
    esac
done
echo "=================== summary"; cat "$S"
