#!/usr/bin/env bash
# Session 2026-11-29, call 1 (build e455c0d: CUBEQWEN_ATTN_IN_STAGES apart from
# CUBEQWEN_GEMV_STAGES): the kernels' decode tests on CUDA (all, with the graph tests) and
# decode_graphs, rerun after a639640's test helper; ncu of the prefill flash kernel at 8192
# tokens; kernel bench of the prefill attention and the 7B matmuls against cuBLAS; 7B prefill
# and decode against llama.cpp in the same run; A/B of the 7B down GEMV's stage count (2, 3).
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/bench-vs-llama; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=$W/kernel-cache
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
CQ=$B/bin-cubeqwen-bin-cubeqwen; KB=$B/bench-cubeqwen-bench-kernels
# Background: llama-bench's build and the 7B file (15 GB).
LLAMA_BENCH_BUILD=$W/llama-cpp bash stage/anchors/llama-bench.sh stage/anchors/llama-cpp.tgz > "$W/prebuild.log" 2>&1 &
bp=$!
( $CQ random-gguf --shape 7b --tokenizer-from stage/tokenizer.gguf "$W/random-7b.gguf.part" > /tmp/x/gguf7b.log 2>&1 && mv "$W/random-7b.gguf.part" "$W/random-7b.gguf" ) &
gp=$!
# 1. Tests: every kernels decode test (graph tests included), then decode_graphs.
( export CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1; cd kernels && timeout 200 $B/test-kernels-test-decode --test-threads=1 --include-ignored --nocapture ) > /tmp/x/t-decode.log 2>&1
echo "rc $?" >> /tmp/x/t-decode.log
grep -E "same bits|waves|test result|panicked|FAILED|Error|^rc|^test " /tmp/x/t-decode.log | cut -c1-220 > /tmp/x/t-decode.txt
stamp "kernels decode tests: $(grep -E '^rc|test result' /tmp/x/t-decode.txt | tr '\n' ' ')"
timeout 100 $B/test-cubeqwen-test-decode_graphs --test-threads=1 --include-ignored --nocapture > /tmp/x/decode_graphs.log 2>&1
stamp "decode_graphs rc=$? $(grep -E 'test result' /tmp/x/decode_graphs.log | tr '\n' ' ')"
# 2. ncu: the flash mma kernel at 8192 tokens (0.5B heads), one launch, full set + SASS table.
( export CUBEQWEN_FULL_SHAPES=1; timeout 150 ncu --clock-control none -k regex:prefill_mma --launch-skip 2 --launch-count 1 --set full --import-source no -o /tmp/x/flash8192 $KB --bench 'attention/prefill8192/flash mma' > /tmp/x/ncu-run.log 2>&1 )
stamp "ncu rc=$?"
ncu -i /tmp/x/flash8192.ncu-rep --page details > /tmp/x/ncu-flash8192.txt 2>&1
ncu -i /tmp/x/flash8192.ncu-rep --page source --csv --print-source sass 2>/dev/null | gzip > /tmp/x/ncu-flash8192-sass.csv.gz
stamp "waiting for the 7B file"; wait $gp; stamp "7B file: $(tail -1 /tmp/x/gguf7b.log)"
wait $bp; stamp "llama build done"
# 3. Kernel bench: prefill attention (0.5B heads, 512/2048/8192), 7B matmuls at m 512/2048 against cuBLAS.
CUBEQWEN_FULL_SHAPES=1 CUBEQWEN_BENCH_JSON=/tmp/x/kb-attn.jsonl timeout 90 $KB --bench 'attention/prefill[0-9]+/flash' > /tmp/x/kb-attn.log 2>&1
stamp "kernel bench attention rc=$?"
CUBEQWEN_FULL_SHAPES=1 CUBEQWEN_BENCH_JSON=/tmp/x/kb-mm7b.jsonl timeout 90 $KB --bench 'matmul/7B [^/]+/m(512|2048)/(auto|cublas)' > /tmp/x/kb-mm7b.log 2>&1
stamp "kernel bench 7B matmul rc=$?"
# 4. cubeqwen and llama.cpp, 7B, same run: pp512, pp2048, tg128.
SHAPES=7b PROMPT=512,2048 DEPTHS=0 SWEEP= REPS=3 bash scripts/bench-vs-llama.sh gpu > /tmp/x/bvl-out.log 2>&1
stamp "bench-vs-llama 7b rc=$?"
# 5. A/B at 7B: the down GEMV with 3 stages against 2 (attn_in at its default 2), alternated.
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/x/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for i in 1 2; do
  for st in 3 2; do
    [ $((SECONDS - t0)) -lt 500 ] || break
    bench "7b gemv stages $st r$i" CUBEQWEN_GEMV_STAGES=$st $CQ bench --model $W/random-7b.gguf -p 0 -n 128 -d 0 -r 3
    stamp "7b gemv stages $st r$i"
  done
done
stamp end
cat "$O/ab.md"; grep -E "^\| (attention|matmul) " /tmp/x/kb-attn.log /tmp/x/kb-mm7b.log | cut -c1-170; cat "$O/bench-vs-llama.md"
grep -E "Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Th|Memory Th|Local|Warp Cycles Per Issued|Issue Slots|Executed Ipc A|L1/TEX Hit|L2 Hit|Block Limit|Dynamic Shared|Static Shared" /tmp/x/ncu-flash8192.txt | head -40
cp -r $W/results /tmp/x/bvl-results 2>/dev/null
rm -f "$O"/*.png /tmp/x/*.ncu-rep.bak
tar czf "$O/extra.tgz" --exclude="*.ncu-rep" -C /tmp x; ls -la "$O"
