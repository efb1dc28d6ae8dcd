#!/usr/bin/env bash
# Perplexity, nominal and effective bits of every fixed KV policy of moqae beside llama.cpp's KV types
# (through llama-cpp-python, flash attention on), same file and windows. Prints a markdown table.
#   bench/kv_policies.sh MODEL TEXT CTX CHUNKS [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 text=$2 ctx=$3 chunks=$4 threads=${5:-2}
echo "| implementation | KV | PPL | nominal bits | effective bits |"
echo "| --- | --- | ---: | ---: | ---: |"
for kv in fp16 int8 int4 sink+int4 int2 sink+int2; do
    out=$(build/moqae-perplexity -m "$model" -f "$text" -c "$ctx" --chunks "$chunks" -t "$threads" --kv "$kv" 2>&1)
    ppl=$(grep -o "PPL = [0-9.]* +/- [0-9.]*" <<<"$out" | cut -c7-)
    bits=$(grep -m1 -o "[0-9.]* nominal / [0-9.]* effective" <<<"$out")
    echo "| moqae | $kv | $ppl | $(cut -d' ' -f1 <<<"$bits") | $(cut -d' ' -f4 <<<"$bits") |"
done
for kv in f16 q8_0 q4_0 q4_1; do
    ppl=$(.venv/bin/python bench/llamacpp_ppl.py -m "$model" -f "$text" -c "$ctx" --chunks "$chunks" -t "$threads" \
          --kv "$kv" 2>/dev/null | grep -o "PPL = [0-9.]* +/- [0-9.]*" | cut -c7-)
    case $kv in f16) b=16;; q8_0) b=8.5;; q4_0) b=4.5;; q4_1) b=5;; esac
    echo "| llama.cpp | $kv | $ppl | $b | $b |"
done
