#!/usr/bin/env bash
# Build the libFuzzer harnesses (tests/fuzz/fuzz-*.c) with clang, ASan and UBSan into build-fuzz/, replay
# the regression inputs (tests/fuzz/regressions/<name>/), then fuzz each harness for a fixed time from
# its committed seeds (tests/fuzz/corpus-<name>/). Fails on any crash, leak, timeout or sanitizer report;
# the input is left in build-fuzz/artifacts-<name>/ (copy it to tests/fuzz/regressions/<name>/).
#   scripts/fuzz.sh            CI size: 60 s per harness (MOQAE_FUZZ_SECONDS or the first argument)
#   scripts/fuzz.sh 3600       the longer offline run: an hour per harness; new inputs accumulate in
#                              build-fuzz/corpus-<name>/ across runs. MOQAE_FUZZ_MERGE=1 then minimises
#                              them into tests/fuzz/corpus-<name>/ (review the size before committing).
# fuzz-tokenizer uses SmolLM2's vocabulary (models/fetch_model.py, cached) and the tiny SentencePiece one.
# Needs clang with libFuzzer (Debian: apt-get install clang-19 libclang-rt-19-dev); $MOQAE_FUZZ_CC picks one.
# Prints one line per harness for docs/RESULTS.md: executions, seconds, corpus files and bytes, crashes.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-${MOQAE_FUZZ_SECONDS:-60}}
build=${MOQAE_FUZZ_BUILD_DIR:-build-fuzz}

cc=${MOQAE_FUZZ_CC:-}
if [ -z "$cc" ]; then
    for c in clang-19 clang-18 clang-17 clang-16 clang; do
        if command -v "$c" >/dev/null 2>&1; then cc=$c; break; fi
    done
fi
if [ -z "$cc" ]; then
    echo "fuzz.sh: no clang found (apt-get install clang-19 libclang-rt-19-dev, or set MOQAE_FUZZ_CC)" >&2
    exit 2
fi

# fuzzer-no-link instruments the library itself for coverage; the harnesses get -fsanitize=fuzzer
# from CMakeLists.txt. Only the harnesses and the static library they link are built (not the shared
# library, the tools or the C tests), which halves the build.
launcher=()
if command -v ccache >/dev/null 2>&1; then launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache); fi
CC=$cc cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo "${launcher[@]}" -DMOQAE_FUZZ=ON \
    -DMOQAE_SANITIZE_ADDRESS=ON -DMOQAE_SANITIZE_UNDEFINED=ON -DMOQAE_BUILD_TESTS=OFF -DMOQAE_BUILD_TOOLS=OFF \
    -DCMAKE_C_FLAGS=-fsanitize=fuzzer-no-link >/dev/null
targets=()
for src in tests/fuzz/fuzz-*.c; do targets+=(--target "$(basename "$src" .c)"); done
cmake --build "$build" -j "$(nproc)" "${targets[@]}"

if [ -z "${MOQAE_FUZZ_VOCAB:-}" ]; then
    smollm2=$(.venv/bin/python models/fetch_model.py smollm2)
    export MOQAE_FUZZ_VOCAB="$smollm2:tests/fuzz/vocab-spm:tests/fuzz/vocab-bpe"
fi
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

status=0
summary=()
for src in tests/fuzz/fuzz-*.c; do
    name=$(basename "$src" .c)
    bin=$build/$name
    name=${name#fuzz-}
    seeds=tests/fuzz/corpus-$name
    work=$build/corpus-$name
    art=$build/artifacts-$name
    log=$build/fuzz-$name.log
    mkdir -p "$work" "$art"
    rm -f "$art"/*

    # Every input that once crashed must now pass (running a file list does not fuzz).
    if [ -d "tests/fuzz/regressions/$name" ] && [ -n "$(ls -A "tests/fuzz/regressions/$name")" ]; then
        if ! "$bin" -artifact_prefix="$art/" tests/fuzz/regressions/"$name"/* >"$build/regressions-$name.log" 2>&1; then
            echo "fuzz.sh: $name: a regression input fails again, see $build/regressions-$name.log" >&2
            tail -30 "$build/regressions-$name.log" >&2
            status=1
            continue
        fi
    fi

    rc=0
    "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$art/" "$work" "$seeds" >"$log" 2>&1 || rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    n_art=$(find "$art" -type f | wc -l)
    files=$(find "$work" -type f | wc -l)
    bytes=$(du -sb "$work" | cut -f1)
    kib=$((bytes / 1024))
    summary+=("fuzz-$name: ${runs:-?} executions in $seconds s, corpus $files files / $kib KiB, $n_art crashes")
    if [ "$rc" -ne 0 ] || [ "$n_art" -ne 0 ]; then
        echo "fuzz.sh: $name failed (exit $rc): inputs in $art/, log $log" >&2
        grep -E "ERROR|SUMMARY|runtime error|check failed|cannot" "$log" | head -20 >&2 || tail -5 "$log" >&2
        status=1
    fi

    if [ "${MOQAE_FUZZ_MERGE:-0}" = 1 ]; then
        "$bin" -merge=1 "$seeds" "$work" >"$build/merge-$name.log" 2>&1
        echo "fuzz.sh: merged into $seeds: $(find "$seeds" -type f | wc -l) files, $(du -sh "$seeds" | cut -f1)"
    fi
done
printf '%s\n' "${summary[@]}"
exit $status
