#!/usr/bin/env bash
# scripts/cuda-check.sh — the GPU runs of issue 7, on the device machine (an H100): build with
# MOQAE_CUDA=ON for sm_90, check the GPU against the CPU (tests/tools/cuda-parity.c: codec bytes,
# attention kernels, logits per KV policy, router decisions, greedy), perplexity GPU vs CPU, time
# SmolLM2 and the LLaMA-2-7B-shaped Q4_0 model at depth.
#   scripts/cuda-check.sh [STAGE ...]
# stages: build res stash smol emulate tiny attnpv parity floor ppl smolbench make7b router7b 7bprobe 7b32k 7b32kgen
#         7bint2_32k walk32k (session 8: the codec-grouped walk and INT2 values on tensor cores) fuse
#         otbuild ot-STAGE (STAGE run with the build of old-tree.tar.gz, a git archive of the commit to compare with)
#         7b32kold 7b128k 7b128kold 7brouter32k 7brouter128k fp16 nofit ncu prof7b profsmol sass
#         (the *old stages and attnpv: v3's INT4 values on CUDA cores, MOQAE_CUDA_PV=0, the fourth increment's path)
#         llamabuild llamabg llamawait llamabench llama128k (llama.cpp's CUDA build side by side)
#         overflow (SmolLM2: budgets with shift/demote and a per-layer router, GPU against the CPU ring with
#         records padded as the GPU's, MOQAE_KV_ALIGN=16) 7bdemote32k 7bdemote128k (7B router, 3-bit budget, demote)
#         partial (-ngl below n_layer: SmolLM2 perplexity against -ngl 0 and 99, the 7B shape's speed)
#         prefill smolpf fill128k pfncu attnpf llamafill profpp imma immacmp immancu pfk encncu cmpold fillb fill128kb (session 9: the prefill kernel against the generic one; the 128k fill; its profile)
#         7bpost32k 7bpost128k post128k 7bpostd0 7brouterpost32k 7brouterpost128k paritypost pplpost smolpost ncupost ncusrc pdlcmp smolpdl wprcmp llamapost (session 11: keys stored after
#         RoPE, --kv-keys post, against before)
# Logs go to $OUT (default /tmp/cuda-out); the summary is printed last. SmolLM2 comes from
# $HOME/stash/smol.part0 (stage stash, an earlier call that carried split/smol.part0) + split/smol.part1
# (the device machine has no network, and one call carries at most 64 MiB; docs/RESULTS.md).
# llama.cpp: build-llama-src/llama.cpp-src.tar.gz, the llama.cpp vendored by llama-cpp-python 0.3.36's sdist
# (`pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:`), repacked with what the CMake build
# of llama-bench needs (CMakeLists.txt, cmake/, common/, ggml/, include/, src/, tools/ but ui/, vendor/,
# licenses/); built in $HOME/llama, so that a build cut off by one call's limit resumes in the next warm one.
set -uo pipefail
OUT=${OUT:-/tmp/cuda-out}
mkdir -p "$OUT"
B=build-gpu
BNEW=$B
TS= # tag suffix of the old tree's runs
SMOL=/tmp/smol.gguf
SMOL_ROUTER=models/smollm2-135m-moqae-balanced.gguf
L7=/tmp/llama7b-q4_0.gguf
R7=/tmp/router7b.gguf
LL=$HOME/llama
LB=$LL/build/bin/llama-bench
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

prof_table() { # ncu --csv gpu__time_duration rows -> kernel, launches, mean us, total us (largest first)
    python3 - "$1" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows:
    sys.exit(print("no ncu rows"))
h = rows[0]; kn = h.index("Kernel Name"); mv = h.index("Metric Value"); un = h.index("Metric Unit")
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in rows[1:]:
    v = float(r[mv].replace(",", "")) * {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1, "us": 1, "msecond": 1e3, "ms": 1e3}.get(r[un], 1)
    k = r[kn].split("(")[0]; tot[k] += v; cnt[k] += 1
for k in sorted(tot, key=tot.get, reverse=True):
    print(f"{k[:60]:60s} {cnt[k]:6d} x {tot[k] / cnt[k]:9.2f} us = {tot[k]:10.1f} us")
PY
}

gguf_py() { # the gguf package from the wheel in split/ (no registry there)
    [ -d /tmp/site/gguf ] || pip install -q --no-index --no-deps --target /tmp/site split/gguf-0.19.0-py3-none-any.whl
}

bench7b() { # tag, then moqae-bench arguments
    local tag=$1$TS; shift
    with_mem "$tag" $B/moqae-bench -m $L7 -ngl 99 -v "$@" 2>&1 | grep -v "^debug" | tee "$OUT/$tag.txt" |
        grep -E "fill|tg|pp|kv cache|cuda:|error" | tee -a "$S"
}

smol_ab() { # VAR "VALUES" PATTERN, then moqae-bench arguments: SmolLM2 with VAR set to each value in turn, fp16 and
            # int4 rings, the output lines matching PATTERN prefixed with VAR=value
    local var=$1 vals=$2 pat=$3 val kv
    shift 3
    for val in $vals; do
        for kv in fp16 int4; do
            env "$var=$val" $B/moqae-bench -m $SMOL -ngl 99 "$@" --kv $kv 2>&1 | grep -E "$pat" |
                sed "s/^/$var=$val /" | tee -a "$S"
        done
    done
}

stages=${*:-build emulate tiny}
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$S"
for st in $stages; do
    note "## $st ($(date +%T))"
    B=$BNEW TS=
    if [ "${st#ot-}" != "$st" ]; then # ot-STAGE: STAGE with the old tree's build (stage otbuild)
        st=${st#ot-} B=/tmp/ot/build-gpu TS=-ot
    fi
    case $st in
    otbuild) # the tree to compare with: old-tree.tar.gz (git archive of a commit; ignored by git, so name it in the call's carry) built in /tmp/ot
        rm -rf /tmp/ot && mkdir -p /tmp/ot && tar xzf old-tree.tar.gz -C /tmp/ot &&
            { cmake -S /tmp/ot -B /tmp/ot/build-gpu -DMOQAE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DMOQAE_BUILD_TESTS=ON &&
              cmake --build /tmp/ot/build-gpu -j16; } > "$OUT/otbuild.log" 2>&1 || tail -20 "$OUT/otbuild.log"
        note "old tree built: $(ls /tmp/ot/build-gpu/moqae-bench 2>&1)" ;;
    build)
        t0=$(date +%s)
        { cmake -S . -B $B -DMOQAE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DMOQAE_BUILD_TESTS=ON &&
          cmake --build $B -j16; } > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
        note "built in $(( $(date +%s) - t0 )) s" ;;
    res) # registers, shared memory and spills of the decode kernels (the compiler's resource report)
        cuobjdump -res-usage $B/libmoqae.so 2>&1 | grep -A1 -E "attn_v3_kernel" |
            grep -oE "_Z[A-Za-z0-9_]+|REG:[0-9]+ STACK:[0-9]+ SHARED:[0-9]+ LOCAL:[0-9]+" | paste - - | tee -a "$S" ;;
    llamabuild) # llama-bench of llama.cpp's CUDA build (sm_90 only); resumes an unfinished build in $LL/build
        [ -d $LL/src ] || { mkdir -p $LL/src && tar xzf build-llama-src/llama.cpp-src.tar.gz -C $LL/src; }
        t0=$(date +%s)
        { [ -f $LL/build/CMakeCache.txt ] || cmake -S $LL/src -B $LL/build -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
              -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
              -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF; } > "$OUT/llamabuild.log" 2>&1 &&
            cmake --build $LL/build --target llama-bench -j16 >> "$OUT/llamabuild.log" 2>&1
        rc=$?
        echo $rc > $LL/done
        [ $rc -eq 0 ] || tail -30 "$OUT/llamabuild.log"
        note "llama.cpp build rc $rc in $(( $(date +%s) - t0 )) s" ;;
    llamabg) # the same in its own process session: it goes on after this call returns (the machine stays warm 30 s)
        mkdir -p $LL/out && rm -f $LL/done
        OUT=$LL/out setsid nohup "$0" llamabuild > $LL/bg.log 2>&1 < /dev/null &
        note "llama.cpp build started in the background (log $LL/out/llamabuild.log)" ;;
    llamawait) # until the background build is done (at most 540 s)
        t0=$(date +%s)
        while [ ! -f $LL/done ] && [ $(( $(date +%s) - t0 )) -lt 540 ]; do sleep 5; done
        cp $LL/out/llamabuild.log "$OUT/" 2>/dev/null
        note "llama.cpp build: $(cat $LL/done 2>/dev/null || echo 'not done') after $(( $(date +%s) - t0 )) s more;" \
            "$(grep -E '^llama.cpp build' $LL/out/summary.md 2>/dev/null)" ;;
    llamabench) # llama.cpp and moqae side by side, same machine, same call: 7B-shaped Q4_0 (q4_0 KV vs int4 ring) at
                # depth 0 and 32768, SmolLM2 pp512/tg128 (f16 KV vs fp16, q4_0 vs int4)
        $LB -m $L7 -ngl 99 -fa 1 -ctk q4_0 -ctv q4_0 -p 0 -n 32 -d 0,32768 -r 3 2>"$OUT/llama-7b.err" | tee "$OUT/llama-7b.md" |
            grep -E "^\|" | tee -a "$S"
        bench7b 7b-int4-d0 -p 0 -n 32 -r 3 --kv int4
        bench7b 7b-int4-32k -c 131072 --depth 32768 -n 32 -r 3 --kv int4
        if [ -f $SMOL ]; then
            for kv in f16 q4_0; do
                $LB -m $SMOL -ngl 99 -fa 1 -ctk $kv -ctv $kv -p 512 -n 128 -r 5 2>>"$OUT/llama-smol.err" | grep -E "^\|" | tee -a "$S"
            done
            for kv in fp16 int4; do
                $B/moqae-bench -m $SMOL -ngl 99 -p 512 -n 128 -r 5 --kv $kv 2>&1 | grep -E "pp|tg" | tee -a "$S"
            done
        fi ;;
    llamapost) # llama.cpp (q4_0 KV) and moqae (int4 ring, keys before and after RoPE) at depth 0, 32768, 131072
        $LB -m $L7 -ngl 99 -fa 1 -ctk q4_0 -ctv q4_0 -p 0 -n 32 -d 0,32768 -r 3 2>"$OUT/llama-7b.err" | grep -E "^\|" | tee -a "$S"
        $LB -m $L7 -ngl 99 -fa 1 -ctk q4_0 -ctv q4_0 -p 0 -n 32 -d 131072 -r 1 2>"$OUT/llama-128k.err" | grep -E "^\|" | tee -a "$S"
        bench7b 7b-int4-d0 -p 0 -n 32 -r 3 --kv int4
        for k in pre post; do bench7b 7b-int4-$k-32k -c 131072 --depth 32768 -n 32 -r 3 --kv int4 --kv-keys $k; done
        bench7b 7b-int4-post-128k -c 131072 --depth 130944 -n 32 -r 3 --kv int4 --kv-keys post ;;
    pdlcmp) # programmatic dependent launch (default) against plain launches (MOQAE_CUDA_PDL=0), alternating
        for pdl in 0 1 0 1; do
            ( export MOQAE_CUDA_PDL=$pdl; bench7b 7b-d0-pdl$pdl -p 0 -n 64 -r 5 --kv int4 )
        done
        for pdl in 0 1; do
            ( export MOQAE_CUDA_PDL=$pdl; bench7b 7b-post-32k-pdl$pdl -c 131072 --depth 32768 -n 32 -r 3 --kv int4 --kv-keys post )
        done ;;
    wprcmp) # the decode mat-vec's warps per row for rows of >= 128 blocks (MOQAE_CUDA_WPR: 2 the default since session 11,
            # 4 before), alternating
        for w in 4 2 1 4 2 1; do
            ( export MOQAE_CUDA_WPR=$w; bench7b 7b-d0-wpr$w -p 0 -n 64 -r 5 --kv int4 | sed "s/^/WPR=$w /" )
        done ;;
    smolpdl) # the same for SmolLM2 (launch-bound decode), fp16 and int4, with prefill
        smol_ab MOQAE_CUDA_PDL "0 1 0 1" "pp|tg" -p 512 -n 128 -r 5 ;;
    llamafill) # the fill itself, side by side: llama.cpp's pp32768 and pp131072 (a prompt from an empty context, its
               # defaults: n_batch 2048, n_ubatch 512) against moqae's fill to 32,768 and 130,944 tokens (n_batch 512)
        for n in 32768 131072; do
            $LB -m $L7 -ngl 99 -fa 1 -ctk q4_0 -ctv q4_0 -p $n -n 0 -r 1 2>>"$OUT/llama-fill.err" | grep -E "^\|" | tee -a "$S"
        done
        bench7b 7b-fill32k -c 32896 --depth 32768 -n 4 -r 1 --kv int4
        bench7b 7b-fill128k -c 131072 --depth 130944 -n 4 -r 1 --kv int4 ;;
    llama128k) # the same at depth 131072 (llama.cpp refills before each repetition: -r 1) and 130944 (moqae)
        $LB -m $L7 -ngl 99 -fa 1 -ctk q4_0 -ctv q4_0 -p 0 -n 32 -d 131072 -r 1 2>"$OUT/llama-128k.err" | grep -E "^\|" | tee -a "$S"
        bench7b 7b-int4-128k -c 131072 --depth 130944 -n 32 -r 3 --kv int4 ;;
    stash)
        mkdir -p "$HOME/stash" && cp split/smol.part0 "$HOME/stash/" && note "stashed part0" ;;
    smol)
        [ -f $SMOL ] || cat "$HOME/stash/smol.part0" split/smol.part1 > $SMOL
        note "smol sha256 $(sha256sum $SMOL | cut -c1-8) (want b179c952)" ;;
    emulate) # the GPU encoder's phases on the CPU against kv-codec.c
        $B/cuda-parity --emulate 2>&1 | tee -a "$S" ;;
    tiny) # a synthetic model (GQA 2, Q4_1, head_dim 64): every check but SmolLM2's
        gguf_py
        PYTHONPATH=/tmp/site python3 models/make_tiny.py -o /tmp/tiny.gguf --vocab bytes --wtype q4_1 --n-embd 256 \
            --n-layer 4 --n-head 4 --n-head-kv 2 --n-ff 512 --n-ctx 2048 > /dev/null
        $B/cuda-parity /tmp/tiny.gguf > "$OUT/parity-tiny.log" 2>&1
        grep -E "^codec|^int8|^attention|^kv|^greedy|^model|failed|error" "$OUT/parity-tiny.log" | tee -a "$S"
        note "parity tiny: $(tail -1 "$OUT/parity-tiny.log")" ;;
    attnpf) # the attention checks with the prefill kernel's 128-row blocks (MOQAE_CUDA_PF=128)
        MOQAE_CUDA_PF=128 $B/cuda-parity /nonexistent.gguf 2>&1 | grep -E "^attention.*prefill" | sed "s/^/PF=128 /" |
            tee -a "$S" ;;
    attnpv) # the attention checks under the other value paths (MOQAE_CUDA_PV=0: CUDA cores, =2: tensor cores
            # with the INT4 codes as normal f16, =4: INT2 on CUDA cores) and session 7's walk (MOQAE_CUDA_WALK=0);
            # no model: cuda-parity stops after its codec and attention checks
        for m in PV=1 PV=0 PV=2 PV=4 WALK=0; do
            env MOQAE_CUDA_$m $B/cuda-parity /nonexistent.gguf 2>&1 | grep -E "^attention" | sed "s/^/$m /" | tee -a "$S"
        done ;;
    walk32k) # the 7B router and INT2 rings at 32k: session 7's walk and INT2 values (WALK=0 PV=4), then each change
        for m in "0 4" "1 4" "1 1"; do
            set -- $m
            MOQAE_CUDA_WALK=$1 MOQAE_CUDA_PV=$2 bench7b 7b-router-32k-walk$1-pv$2 -c 131072 --depth 32768 -n 32 -r 3 --router $R7
        done
        for m in 4 1; do
            MOQAE_CUDA_PV=$m bench7b 7b-int2-32k-pv$m -c 131072 --depth 32768 -n 32 -r 3 --kv int2
        done ;;
    parity)
        $B/cuda-parity $SMOL --router $SMOL_ROUTER > "$OUT/parity.log" 2>&1
        grep -E "^codec|^attention|^kv|^greedy|^model|^router|^logits floor|floor:|failed|error" "$OUT/parity.log" | tee -a "$S"
        note "parity SmolLM2: $(tail -1 "$OUT/parity.log")" ;;
    ppl) # SmolLM2 perplexity on the repository's wikitext excerpt, -c 512, 8 windows: GPU and CPU
        for kv in fp16 int8 int4 int2 sink+int4 sink+int2 router; do
            if [ $kv = router ]; then a="--router $SMOL_ROUTER"; else a="--kv $kv"; fi
            for ngl in 99 0; do
                echo -n "ppl $kv -ngl $ngl: " | tee -a "$S"
                $B/moqae-perplexity -m $SMOL -f tests/data/wikitext-2-excerpt.txt -c 512 --chunks 8 -t 16 -ngl $ngl $a \
                    2>&1 | grep -E "Final|kv mean|error" | tr '\n' ' ' | tee -a "$S"
                echo | tee -a "$S"
            done
        done ;;
    overflow) # the GPU ring's bookkeeping is kv-ring.c's: the same decisions (chunk mix) and perplexity as the CPU
        C_R="--router $SMOL_ROUTER"; C_C="--router models/smollm2-135m-moqae-compact.gguf"
        for cfg in "learned-demote|$C_R --kv-bits 3 --kv-overflow demote" "recency-demote|--kv sink+int4 --kv-bits 3 --kv-overflow demote" \
                   "shift|--kv sink+int4 --kv-bits 2.5 --kv-overflow shift" "router-shift|$C_R --kv-bits 2.5 --kv-overflow shift" \
                   "per-layer|$C_C" "per-layer-demote|$C_C --kv-bits 3 --kv-overflow demote" "int8-demote|--kv int8 --kv-bits 5 --kv-overflow demote"; do
            tag=${cfg%%|*}; a=${cfg#*|}
            for ngl in 99 0; do
                echo -n "overflow $tag -ngl $ngl: " | tee -a "$S"
                MOQAE_KV_ALIGN=16 $B/moqae-perplexity -m $SMOL -f tests/data/wikitext-2-excerpt.txt -c 1024 --chunks 4 -b 32 \
                    -t 16 -ngl $ngl $a 2>&1 | grep -E "Final|kv cache|kv mean|error" | tr '\n' ' ' | tee -a "$S"
                echo | tee -a "$S"
            done
        done ;;
    partial) # partial offload: the last N layers (and the head) on the GPU, the first ones on the CPU (SmolLM2: 30 layers)
        for cfg in "int4|--kv int4" "router|--router $SMOL_ROUTER" "per-layer|--router models/smollm2-135m-moqae-compact.gguf" \
                   "learned-demote|--router $SMOL_ROUTER --kv-bits 3 --kv-overflow demote -b 32"; do
            tag=${cfg%%|*}; a=${cfg#*|}
            for ngl in 0 1 15 29 30 99; do
                echo -n "partial $tag -ngl $ngl: " | tee -a "$S"
                $B/moqae-perplexity -m $SMOL -f tests/data/wikitext-2-excerpt.txt -c 1024 --chunks 4 -t 16 -ngl $ngl $a \
                    2>&1 | grep -E "Final|kv cache|error" | tr '\n' ' ' | tee -a "$S"
                echo | tee -a "$S"
            done
        done
        for ngl in 16 28; do # the 7B shape with its first layers on the CPU (16 threads)
            $B/moqae-bench -m $L7 -ngl $ngl -t 16 -p 512 -n 16 -r 2 --kv int4 2>&1 | grep -E "pp|tg|error" | sed "s/^/7B -ngl $ngl: /" |
                tee -a "$S"
        done ;;
    smolbench)
        for kv in fp16 int4; do
            with_mem smol-$kv $B/moqae-bench -m $SMOL -ngl 99 -p 512 -n 128 -r 5 --kv $kv 2>&1 | grep -E "pp|tg" | tee -a "$S"
        done ;;
    make7b)
        gguf_py
        [ -f $L7 ] || PYTHONPATH=/tmp/site python3 models/make_llama7b.py -o $L7 2>&1 | tail -1 | tee -a "$S" ;;
    router7b) # an untrained router for the 7B shape: int4/int2 experts, the first chunk frozen at FP16
        gguf_py
        PYTHONPATH=/tmp/site:train python3 train/export_router.py -m $L7 --experts 4,2 --expected-bits 3.0 -o $R7 2>&1 |
            tail -1 | tee -a "$S" ;;
    7bprobe) # decode at depth 0 (weights only); prefill
        bench7b 7b-probe -p 512 -n 32 -r 3 --kv int4 ;;
    fuse) # Q, K, V and gate, up in one mat-vec launch each (default) against one launch per product (MOQAE_CUDA_FUSE=0)
        for f in 0 1; do
            MOQAE_CUDA_FUSE=$f bench7b 7b-d0-fuse$f -p 0 -n 64 -r 5 --kv int4
            [ -f $SMOL ] && MOQAE_CUDA_FUSE=$f $B/moqae-bench -m $SMOL -ngl 99 -p 0 -n 128 -r 5 --kv int4 2>&1 |
                grep -E "tg" | sed "s/^/FUSE=$f /" | tee -a "$S"
        done ;;
    7b32k)
        bench7b 7b-int4-32k -c 131072 --depth 32768 -n 32 -r 3 --kv int4 ;;
    7b32kold) # v3's INT4 values on CUDA cores (the fourth increment's loop), for a before/after in one call
        MOQAE_CUDA_PV=0 bench7b 7b-int4-32k-old -c 131072 --depth 32768 -n 32 -r 3 --kv int4 ;;
    7b128kold)
        MOQAE_CUDA_PV=0 bench7b 7b-int4-128k-old -c 131072 --depth 130944 -n 32 -r 3 --kv int4 ;;
    7b32kgen) # the generic attention kernel for decode (comparison with v3)
        MOQAE_CUDA_ATTN=1 bench7b 7b-int4-32k-generic -c 32896 --depth 32768 -n 16 -r 3 --kv int4 ;;
    7bint2_32k) # every chunk INT2 (the router's cheapest expert alone)
        bench7b 7b-int2-32k -c 131072 --depth 32768 -n 32 -r 3 --kv int2 ;;
    7b128k)
        bench7b 7b-int4-128k -c 131072 --depth 130944 -n 32 -r 3 --kv int4 ;;
    7bpost32k) # keys stored after RoPE (--kv-keys post: attn_v3_kernel's v3_key_post), pre then post in one call
        for k in pre post; do bench7b 7b-int4-$k-32k -c 131072 --depth 32768 -n 32 -r 3 --kv int4 --kv-keys $k; done ;;
    7bpost128k)
        for k in pre post; do bench7b 7b-int4-$k-128k -c 131072 --depth 130944 -n 32 -r 3 --kv int4 --kv-keys $k; done ;;
    post128k) # keys after RoPE only (with ot-post128k: the old tree's kernel in the same call)
        bench7b 7b-int4-post-128k -c 131072 --depth 130944 -n 32 -r 3 --kv int4 --kv-keys post ;;
    7bpostd0) # depth 0 (the weights path alone) and the 32k router ring with keys after RoPE
        bench7b 7b-d0 -p 0 -n 64 -r 5 --kv int4 --kv-keys post ;;
    7brouterpost32k)
        bench7b 7b-router-post-32k -c 131072 --depth 32768 -n 32 -r 3 --router $R7 --kv-keys post ;;
    7brouterpost128k)
        bench7b 7b-router-post-128k -c 131072 --depth 130944 -n 32 -r 3 --router $R7 --kv-keys post ;;
    paritypost) # cuda-parity with keys stored after RoPE on both paths (the CPU ring's and the GPU's records)
        MOQAE_KV_KEYS=post $B/cuda-parity $SMOL --router $SMOL_ROUTER > "$OUT/parity-post.log" 2>&1
        grep -E "^kv|^router|^greedy kv int4|v3 kernel" "$OUT/parity-post.log" | tee -a "$S"
        note "parity SmolLM2, keys after RoPE: $(tail -1 "$OUT/parity-post.log")" ;;
    pplpost) # SmolLM2 perplexity with keys before and after RoPE, GPU and CPU
        for kv in int4 int2 sink+int4 router; do
            if [ $kv = router ]; then a="--router $SMOL_ROUTER"; else a="--kv $kv"; fi
            for k in pre post; do
                for ngl in 99 0; do
                    echo -n "ppl $kv keys $k -ngl $ngl: " | tee -a "$S"
                    $B/moqae-perplexity -m $SMOL -f tests/data/wikitext-2-excerpt.txt -c 512 --chunks 8 -t 16 -ngl $ngl $a \
                        --kv-keys $k 2>&1 | grep -E "Final|kv mean|error" | tr '\n' ' ' | tee -a "$S"
                    echo | tee -a "$S"
                done
            done
        done ;;
    smolpost) # SmolLM2 decode and prefill, keys before and after RoPE
        for k in pre post pre post; do
            $B/moqae-bench -m $SMOL -ngl 99 -p 512 -n 128 -r 5 --kv int4 --kv-keys $k 2>&1 | grep -E "pp|tg" |
                sed "s/^/keys $k: /" | tee -a "$S"
        done ;;
    7brouter32k)
        bench7b 7b-router-32k -c 131072 --depth 32768 -n 32 -r 3 --router $R7 ;;
    7brouter128k)
        bench7b 7b-router-128k -c 131072 --depth 130944 -n 32 -r 3 --router $R7 ;;
    7bdemote32k) # the untrained 7B router under a 3-bit budget: the ring demotes (recency: the router has no weights)
        bench7b 7b-router-demote-32k -c 32768 --depth 32640 -n 32 -r 3 --router $R7 --kv-bits 3 --kv-overflow demote ;;
    7bdemote128k)
        bench7b 7b-router-demote-128k -c 131072 --depth 130944 -n 32 -r 3 --router $R7 --kv-bits 3 --kv-overflow demote ;;
    prefill) # the prefill kernel (default) against the generic kernel (MOQAE_CUDA_ATTN=1, the earlier prefill) in one
             # call: 7B pp512 at depth 0 and the fill to 32k
        # (MOQAE_CUDA_PF=128: the prefill kernel with 128 rows per block instead of 256)
        for k in "ATTN=1" "PF=128" "PF=256"; do
            ( export MOQAE_CUDA_$k; bench7b 7b-pp512-${k/=/} -p 512 -n 0 -r 3 --kv int4
              bench7b 7b-fill32k-${k/=/} -c 32896 --depth 32768 -n 4 -r 1 --kv int4 )
        done ;;
    smolpf) # the same for SmolLM2 pp512 (fp16 and int4 rings)
        smol_ab MOQAE_CUDA_ATTN "1 0 1 0" "pp" -p 512 -n 0 -r 5 ;;
    fill128k) # the fill to 130,944 tokens (int4) and decode there
        bench7b 7b-fill128k -c 131072 --depth 130944 -n 32 -r 1 --kv int4 ;;
    pfncu) # the prefill kernel during a fill to 16k: duration, warp stalls, instructions, occupancy
        timeout 200 ncu --kernel-name regex:attn_pf_kernel --launch-skip 200 --launch-count 1 --section SpeedOfLight \
            --section WarpStateStats --section InstructionStats --section SchedulerStats --section Occupancy \
            $B/moqae-bench -m $L7 -ngl 99 -c 16896 --depth 16384 -n 1 -r 1 --kv int4 > "$OUT/pfncu.txt" 2>&1
        grep -E "Duration|Compute \(SM\) Throughput|Stall|Warp Cycles Per Issued|Executed Instructions  |No Eligible|Issued Warp|Occupancy|Registers" \
            "$OUT/pfncu.txt" | head -60 | tee -a "$S" ;;
    fp16)
        bench7b 7b-fp16-32k -c 32896 --depth 32768 -n 32 -r 3 --kv fp16 ;;
    nofit) # FP16 KV at 128k: 64 GiB of ring, fits an 80 GB H100 but not a 24 GiB card; 256k fits nothing
        MOQAE_CUDA_MEMORY_LIMIT=24G $B/moqae-bench -m $L7 -ngl 99 -c 131072 --depth 130944 -n 32 -r 3 --kv fp16 2>&1 |
            tail -2 | tee -a "$S"
        $B/moqae-bench -m $L7 -ngl 99 -c 262144 --depth 262016 -n 32 -r 3 --kv fp16 2>&1 | tail -2 | tee -a "$S" ;;
    ncu) # the decode kernels at depth 16k: speed of light, warp stalls, occupancy
        for k in attn_v3_kernel:2 mmvq_kernel:7; do
            timeout 150 ncu --kernel-name regex:"${k%%:*}" --launch-count "${k##*:}" --section SpeedOfLight \
                --section WarpStateStats --section Occupancy --section LaunchStats \
                $B/moqae-bench -m $L7 -ngl 99 -c 16896 --depth 16384 -n 2 -r 1 --kv int4 >> "$OUT/ncu.txt" 2>&1
        done
        grep -E "^  [a-zA-Z_0-9<>, ]+\(|Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Stall|Warp Cycles Per Issued|Issued Warp|Block Limit" \
            "$OUT/ncu.txt" | head -80 | tee -a "$S" ;;
    ncupost) # the decode attention at depth 16k, keys before and after RoPE: duration, DRAM, instructions
        for k in pre post; do
            echo "### keys $k" >> "$OUT/ncupost.txt"
            timeout 150 ncu --kernel-name regex:attn_v3_kernel --launch-skip 64 --launch-count 1 --section SpeedOfLight \
                --section WarpStateStats --section InstructionStats --section Occupancy \
                $B/moqae-bench -m $L7 -ngl 99 -c 16896 --depth 16384 -n 4 -r 1 --kv int4 --kv-keys $k >> "$OUT/ncupost.txt" 2>&1
        done
        grep -E "^### |^  [a-zA-Z_0-9<>, ]+\(|Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Executed Instructions  |Issued Warp" \
            "$OUT/ncupost.txt" | head -60 | tee -a "$S" ;;
    ncusrc) # per-SASS-instruction counts and stall samples of the decode attention (keys after RoPE, depth 16k)
        timeout 240 ncu --kernel-name regex:attn_v3_kernel --launch-skip 64 --launch-count 1 --set full --import-source yes \
            -o "$OUT/v3post" $B/moqae-bench -m $L7 -ngl 99 -c 16896 --depth 16384 -n 4 -r 1 --kv int4 --kv-keys post \
            > "$OUT/ncusrc.log" 2>&1
        ncu -i "$OUT/v3post.ncu-rep" --page source --csv --print-source sass > "$OUT/v3post-sass.csv" 2>&1
        rm -f "$OUT/v3post.ncu-rep"
        note "ncusrc: $(wc -l < "$OUT/v3post-sass.csv") SASS rows; $(head -c 300 "$OUT/v3post-sass.csv" | head -2 | tail -1 | cut -c1-200)" ;;
    ncumix) # attention at depth 16k under int4, int2 and the router's mix: duration, warp stalls, instructions
        for kv in "--kv int4" "--kv int2" "--router $R7"; do
            echo "### $kv" >> "$OUT/ncumix.txt"
            timeout 150 ncu --kernel-name regex:attn_v3_kernel --launch-skip 64 --launch-count 1 --section SpeedOfLight \
                --section WarpStateStats --section InstructionStats --section SchedulerStats \
                $B/moqae-bench -m $L7 -ngl 99 -c 16896 --depth 16384 -n 4 -r 1 $kv >> "$OUT/ncumix.txt" 2>&1
        done
        grep -E "^### |Duration|Compute \(SM\) Throughput|Stall|Warp Cycles Per Issued|Executed Instructions  |No Eligible|Issued Warp" \
            "$OUT/ncumix.txt" | head -90 | tee -a "$S" ;;
    prof7b) # every kernel of the 7B decode at depth 0 (pp1 + tg2, warm-up included): mean time per launch
        timeout 200 ncu --metrics gpu__time_duration.sum --csv $B/moqae-bench -m $L7 -ngl 99 -p 1 -n 2 -r 1 --kv int4 \
            > "$OUT/prof7b.csv" 2>/dev/null
        prof_table "$OUT/prof7b.csv" | tee -a "$S" ;;
    imma) # prefill's weight products: 4 quant blocks per stage (default) against one (MOQAE_CUDA_IMMA=1), 7B pp512 and
          # the fill to 32k, SmolLM2 pp512 (int4, fp16)
        for k in 1 0 1 0; do
            ( export MOQAE_CUDA_IMMA=$k; bench7b 7b-pp512-imma$k -p 512 -n 0 -r 5 --kv int4 )
            if [ -f $SMOL ]; then
                for kv in int4 fp16; do
                    MOQAE_CUDA_IMMA=$k $B/moqae-bench -m $SMOL -ngl 99 -p 512 -n 0 -r 5 --kv $kv 2>&1 | grep -E "pp" |
                        sed "s/^/IMMA=$k /" | tee -a "$S"
                done
            fi
        done
        for k in 1 0; do
            ( export MOQAE_CUDA_IMMA=$k; bench7b 7b-fill32k-imma$k -c 32896 --depth 32768 -n 4 -r 1 --kv int4 )
        done ;;
    pfk) # the prefill kernel's quantized keys on tensor cores (default) against per-row decode (MOQAE_CUDA_PFK=0), fill 32k
        for k in 0 1 0 1; do
            ( export MOQAE_CUDA_PFK=$k; bench7b 7b-fill32k-pfk$k -c 32896 --depth 32768 -n 4 -r 1 --kv int4 )
        done ;;
    encncu) # the KV encoder in a 7B pp512 (one launch = one layer's chunks x heads x keys/values)
        timeout 300 ncu --kernel-name regex:encode_kernel --launch-skip 4 --launch-count 1 --section SpeedOfLight \
            --section WarpStateStats --section SourceCounters --section Occupancy --section LaunchStats \
            $B/moqae-bench -m $L7 -ngl 99 -p 512 -n 0 -r 1 --kv ${ENC_KV:-int4} > "$OUT/encncu.txt" 2>&1
        grep -E "Duration|Registers|Achieved Occupancy|Theoretical Occupancy|Block Limit|Warp Cycles Per Issued|Compute \(SM\)|Grid Size|Branch Instructions  |Dynamic Shared" \
            "$OUT/encncu.txt" | head -30 | tee -a "$S" ;;
    fillb) # the fill to 32k with micro-batches of 512, 1024 and 2048 tokens (-b), alternating
        for b in 512 1024 2048 512 1024 2048; do
            bench7b 7b-fill32k-b$b -c 32896 --depth 32768 -n 4 -r 1 --kv int4 -b $b
        done ;;
    fill128kb) # the fill to 130,944 tokens with micro-batches of 2048 (-b 2048), decode there, peak memory
        bench7b 7b-fill128k-b2048 -c 131072 --depth 130944 -n 32 -r 1 --kv int4 -b 2048 ;;
    cmpold) # the tree against the old one (stage otbuild), alternating in one call: 7B pp512 and the fill to
            # 32k (int4), SmolLM2 pp512 (int4, int2, fp16) when stashed
        for t in new old new old; do
            b=$BNEW; [ $t = old ] && b=/tmp/ot/build-gpu
            $b/moqae-bench -m $L7 -ngl 99 -p 512 -n 0 -r 5 --kv int4 2>&1 | grep -E "pp512" | sed "s/^/$t /" | tee -a "$S"
            $b/moqae-bench -m $L7 -ngl 99 -c 32896 --depth 32768 -n 4 -r 1 --kv int4 2>&1 | grep -E "fill" |
                sed "s/^/$t /" | tee -a "$S"
            for kv in int4 int2 fp16; do
                [ -f $SMOL ] && $b/moqae-bench -m $SMOL -ngl 99 -p 512 -n 0 -r 5 --kv $kv 2>&1 | grep -E "pp512" |
                    sed "s/^/$t /" | tee -a "$S"
            done
        done ;;
    immacmp) # the prefill's weight products against the old tree's (stage otbuild) in one call: 7B pp512, SmolLM2 pp512
        for t in new old new old; do
            b=$BNEW; [ $t = old ] && b=/tmp/ot/build-gpu
            $b/moqae-bench -m $L7 -ngl 99 -p 512 -n 0 -r 5 --kv int4 2>&1 | grep -E "pp512" | sed "s/^/$t /" | tee -a "$S"
            [ -f $SMOL ] && $b/moqae-bench -m $SMOL -ngl 99 -p 512 -n 0 -r 5 --kv fp16 2>&1 | grep -E "pp512" |
                sed "s/^/$t /" | tee -a "$S"
        done ;;
    immancu) # one prefill weight product (the 7B gate/up shape, launch 20 of a pp512): throughput, stalls, occupancy
        timeout 200 ncu --kernel-name regex:imma_kernel --launch-skip 20 --launch-count 1 --section SpeedOfLight \
            --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
            --section MemoryWorkloadAnalysis --print-details all \
            $B/moqae-bench -m $L7 -ngl 99 -p 512 -n 0 -r 1 --kv int4 > "$OUT/immancu.txt" 2>&1
        grep -E "imma_kernel|Duration|Throughput|Stall|stall|Warp Cycles Per Issued|Issued Warp|No Eligible|Occupancy|Registers|Block Limit|Executed Ipc" \
            "$OUT/immancu.txt" | head -60 | tee -a "$S" ;;
    profpp) # every kernel of a 7B pp512 (int4 ring; warm-up included) and of SmolLM2 pp512 (int4, fp16): time per launch
        timeout 200 ncu --metrics gpu__time_duration.sum --csv $B/moqae-bench -m $L7 -ngl 99 -p 512 -n 0 -r 1 --kv int4 \
            > "$OUT/profpp7b.csv" 2>/dev/null
        prof_table "$OUT/profpp7b.csv" | head -14 | tee -a "$S"
        if [ -f $SMOL ]; then
            for kv in int4 fp16; do
                timeout 120 ncu --metrics gpu__time_duration.sum --csv $B/moqae-bench -m $SMOL -ngl 99 -p 512 -n 0 -r 1 \
                    --kv $kv > "$OUT/profppsmol.csv" 2>/dev/null
                note "SmolLM2 pp512 $kv:"; prof_table "$OUT/profppsmol.csv" | head -10 | tee -a "$S"
            done
        fi ;;
    profsmol) # the same for SmolLM2 (tg4)
        timeout 120 ncu --metrics gpu__time_duration.sum --csv $B/moqae-bench -m $SMOL -ngl 99 -p 1 -n 4 -r 1 --kv fp16 \
            > "$OUT/profsmol.csv" 2>/dev/null
        prof_table "$OUT/profsmol.csv" | tee -a "$S" ;;
    sass) # the decode kernels' machine code, and an instruction histogram of attention
        cuobjdump -sass -fun '_Z14attn_v3_kernelILi128ELi1EEv20moqae_cuda_ring_geom20moqae_cuda_attn_args' \
            $B/libmoqae.so > "$OUT/attn-v3.sass" 2>&1
        grep -oE '^ +/\*[0-9a-f]{4}\*/ +[A-Z][A-Z0-9_.]*' "$OUT/attn-v3.sass" | awk '{print $2}' | sort | uniq -c |
            sort -rn | head -25 | tr '\n' ' ' | tee -a "$S"; echo | tee -a "$S" ;;
    floor) # the CPU's own noise floor: fp16-KV logits under each CPU ISA and on the GPU, compared
        for isa in scalar avx2 avx512; do MOQAE_CPU=$isa $B/cuda-parity --logits /tmp/l-$isa.bin $SMOL 0 > /dev/null; done
        $B/cuda-parity --logits /tmp/l-gpu.bin $SMOL 99 > /dev/null
        for pr in "scalar avx512" "avx2 avx512" "scalar avx2" "avx512 gpu" "scalar gpu"; do
            set -- $pr; $B/cuda-parity --compare /tmp/l-$1.bin /tmp/l-$2.bin 49152 | sed 's|/tmp/l-||g' | tee -a "$S"
        done ;;
    *) note "unknown stage $st" ;;
    esac
done
rm -f "$OUT"/mem-*.txt # their peaks are in the summary (and the device tool fetches a bounded number of files)
echo "=================== summary"; cat "$S"
