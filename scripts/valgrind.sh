#!/usr/bin/env bash
# Valgrind memcheck of short moqae-cli runs, which must show zero errors and zero leaks of any kind. On
# SmolLM2-135M: a generation (3-token prompt, 2 greedy tokens, 2 threads, -c 64: about 20 s under
# valgrind) and three error paths that free a loaded model (a KV cache too large to allocate, a prompt
# longer than the context, an unknown KV policy). On a tiny model (models/make_tiny.py; SmolLM2 needs
# minutes under valgrind to fill a 32-token chunk) the mixed-bit KV ring: sink+int4 chunks shifted out
# of a 64-token context, int8 chunks demoted to int2 in a 12 KiB budget. Uses the normal build
# ($MOQAE_BUILD_DIR, default build/; built if needed). Valgrind emulates no AVX-512, so the AVX2 or
# scalar kernels are the ones checked.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${MOQAE_BUILD_DIR:-build}
MOQAE_BUILD_DIR=$build scripts/build.sh >/dev/null
model=$(.venv/bin/python models/fetch_model.py smollm2)
logs=$build/valgrind-logs
mkdir -p "$logs"
status=0

if ! out=$(.venv/bin/python models/make_tiny.py -o "$logs/tiny.gguf" --vocab bpe --wtype q4_0 2>&1); then
    echo "valgrind.sh: cannot make the tiny model: $out" >&2
    exit 1
fi
tiny_prompt=$(head -c 200 tests/data/wikitext-2-test-head.txt)

# name, expected exit status of moqae-cli, model, then its arguments. valgrind exits 99 on any error or
# leak.
run() {
    local name=$1 want=$2 m=$3
    shift 3
    local rc=0
    valgrind --leak-check=full --show-leak-kinds=all --errors-for-leak-kinds=all --error-exitcode=99 \
        --track-origins=yes --log-file="$logs/$name.valgrind" "$build/moqae-cli" -m "$m" "$@" \
        >"$logs/$name.out" 2>"$logs/$name.err" || rc=$?
    if [ "$rc" -ne "$want" ] || ! grep -q "ERROR SUMMARY: 0 errors" "$logs/$name.valgrind"; then
        echo "valgrind.sh: $name failed (exit $rc, expected $want):" >&2
        grep -vE "^==[0-9]+== ?$" "$logs/$name.valgrind" | tail -40 >&2
        tail -5 "$logs/$name.err" >&2
        status=1
    else
        echo "valgrind.sh: $name OK ($(grep -o 'total heap usage:.*' "$logs/$name.valgrind"))"
    fi
}

run generate 0 "$model" -p "Colors:" -n 2 --temp 0 -t 2 -c 64
run kv-too-large 1 "$model" -p "Colors:" -n 2 -c 16777216
run prompt-too-long 1 "$model" -p "one two three four five six seven eight nine ten" -c 4
run bad-kv-policy 1 "$model" -p "Colors:" --kv int3
run ring-shift 0 "$logs/tiny.gguf" -p "$tiny_prompt" -n 100 -c 64 -b 16 --kv sink+int4 --kv-overflow shift --temp 0 -t 2
run ring-demote 0 "$logs/tiny.gguf" -p "$tiny_prompt" -n 100 -c 256 -b 16 --kv int8 --kv-budget 12K \
    --kv-overflow demote --temp 0 -t 2
exit $status
