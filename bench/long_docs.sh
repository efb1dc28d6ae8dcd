#!/usr/bin/env bash
# Perplexity on long documents: the first WINDOWS windows of CTX tokens of every text file in DIR, for
# each KV policy given (a --kv policy name, or a router file ending in .gguf; either with @BITS: under a
# budget of BITS effective bits per element, --kv-overflow demote -b 32). Prints one row per
# document and policy, then the mean NLL over documents (every window scores the same number of tokens,
# so exp(mean log PPL) is the PPL of all scored tokens together).
#   bench/long_docs.sh MODEL DIR CTX WINDOWS THREADS POLICY...
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 dir=$2 ctx=$3 windows=$4 threads=$5
shift 5
echo "| document | KV | PPL | nominal / effective bits |"
echo "| --- | --- | ---: | --- |"
declare -A sum n
for doc in "$dir"/*.txt; do
    for p in "$@"; do
        pol=${p%@*} extra=()
        [[ $p == *@* ]] && extra=(--kv-bits "${p##*@}" --kv-overflow demote -b 32)
        if [[ $pol == *.gguf ]]; then kvarg=(--router "$pol"); name=$(basename "$pol" .gguf); else kvarg=(--kv "$pol"); name=$pol; fi
        [[ $p == *@* ]] && name="$name@${p##*@}"
        kvarg+=("${extra[@]}")
        out=$(build/moqae-perplexity -m "$model" -f "$doc" -c "$ctx" --chunks "$windows" -t "$threads" "${kvarg[@]}" 2>&1)
        ppl=$(grep -o "PPL = [0-9.]*" <<<"$out" | cut -c7-)
        bits=$(grep -m1 -o "[0-9.]* nominal / [0-9.]* effective" <<<"$out" | sed 's/ effective//; s/ nominal//')
        echo "| $(basename "$doc" .txt) | $name | $ppl | $bits |"
        sum[$name]=$(python3 -c "import math; print(${sum[$name]:-0} + math.log($ppl))")
        n[$name]=$(( ${n[$name]:-0} + 1 ))
    done
done
for p in "$@"; do
    pol=${p%@*} name=$pol
    [[ $pol == *.gguf ]] && name=$(basename "$pol" .gguf)
    [[ $p == *@* ]] && name="$name@${p##*@}"
    echo "| **all $(( n[$name] )) documents** | $name | $(python3 -c "import math; print(f'{math.exp(${sum[$name]} / ${n[$name]}):.4f}')") | |"
done
