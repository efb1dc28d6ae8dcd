#!/usr/bin/env bash
# Valgrind memcheck of short moqae-cli runs on SmolLM2-135M, which must show zero errors and zero leaks
# of any kind: a generation (3-token prompt, 2 greedy tokens, 2 threads, -c 64: about 20 s under
# valgrind) and three error paths that free a loaded model (a KV cache too large to allocate, a prompt
# longer than the context, an unknown KV policy). Uses the normal build ($MOQAE_BUILD_DIR, default
# build/; built if needed). Valgrind emulates no AVX-512, so the AVX2 or scalar kernels are checked.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${MOQAE_BUILD_DIR:-build}
MOQAE_BUILD_DIR=$build scripts/build.sh >/dev/null
model=$(.venv/bin/python models/fetch_model.py smollm2)
logs=$build/valgrind-logs
mkdir -p "$logs"
status=0

# name, expected exit status of moqae-cli, then its arguments. valgrind exits 99 on any error or leak.
run() {
    local name=$1 want=$2
    shift 2
    local rc=0
    valgrind --leak-check=full --show-leak-kinds=all --errors-for-leak-kinds=all --error-exitcode=99 \
        --track-origins=yes --log-file="$logs/$name.valgrind" "$build/moqae-cli" -m "$model" "$@" \
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

run generate 0 -p "Colors:" -n 2 --temp 0 -t 2 -c 64
run kv-too-large 1 -p "Colors:" -n 2 -c 16777216
run prompt-too-long 1 -p "one two three four five six seven eight nine ten" -c 4
run bad-kv-policy 1 -p "Colors:" --kv int3
exit $status
