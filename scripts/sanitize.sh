#!/usr/bin/env bash
# The sanitizer job: build with AddressSanitizer and UndefinedBehaviorSanitizer (plus LeakSanitizer)
# into build-asan/ ($MOQAE_ASAN_BUILD_DIR), run the C tests (ctest), then a short end-to-end run on
# SmolLM2-135M: moqae-cli (prompt, 16 greedy tokens, 2 threads, a 3-token micro-batch so that several
# batches and the decode path run), two runs through the mixed-bit KV ring (int8 chunks demoted to int2
# when a 512 KiB budget runs out; sink+int4 chunks shifted out of a 64-token context) and
# moqae-perplexity (two 128-token windows of the test text).
# Any sanitizer report fails the job: halt_on_error makes the process exit non-zero, and the output is
# also searched for reports. Does not run pytest (the tools' behaviour is tested on the normal build).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${MOQAE_ASAN_BUILD_DIR:-build-asan}
MOQAE_BUILD_DIR=$build MOQAE_BUILD_TYPE=RelWithDebInfo scripts/build.sh \
    -DMOQAE_SANITIZE_ADDRESS=ON -DMOQAE_SANITIZE_UNDEFINED=ON -DMOQAE_BUILD_TESTS=ON

export ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
logs=$build/sanitize-logs
mkdir -p "$logs"
status=0

# Run a command, keep its output, fail on a non-zero exit or on anything that looks like a report.
check() {
    local name=$1
    shift
    local rc=0
    "$@" >"$logs/$name.out" 2>"$logs/$name.err" || rc=$?
    if [ "$rc" -ne 0 ] || grep -qE "ERROR: (Address|Leak)Sanitizer|runtime error:|SUMMARY: " "$logs/$name.err"; then
        echo "sanitize.sh: $name failed (exit $rc):" >&2
        tail -40 "$logs/$name.err" >&2
        status=1
    else
        echo "sanitize.sh: $name OK"
    fi
}

check ctest bash -c 'cd "$1" && ctest --output-on-failure -j 2' _ "$build"
model=$(.venv/bin/python models/fetch_model.py smollm2)
check cli "$build/moqae-cli" -m "$model" -p "The three primary colors are" -n 16 --temp 0 -t 2 -b 3 -c 64
check cli-sampled "$build/moqae-cli" -m "$model" -p "Once upon a time" -n 8 -s 7 -t 2 --repeat-penalty 1.1
check ring-demote "$build/moqae-cli" -m "$model" -p "Count: 1, 2, 3," -n 80 -c 512 --kv int8 --kv-budget 512K \
    --kv-overflow demote --temp 0 -t 2
# the balanced router's learned demotion order (record by record), then a chunk that cannot fit even with
# every older record at int2 (a clean stop, nothing demoted)
check ring-weighted "$build/moqae-cli" -m "$model" -p "Count: 1, 2, 3," -n 150 -c 512 \
    --router models/smollm2-135m-moqae-balanced.gguf --kv-budget 1250K --kv-overflow demote --temp 0 -t 2
check ring-shift "$build/moqae-cli" -m "$model" -p "Count: 1, 2, 3," -n 80 -c 64 --kv sink+int4 --kv-overflow shift \
    --temp 0 -t 2
check perplexity "$build/moqae-perplexity" -m "$model" -f tests/data/wikitext-2-test-head.txt -c 128 --chunks 2 -t 2
exit $status
