#!/usr/bin/env bash
# Session 2026-11-29, call 2 (build 1b8ffca: the mma flash kernel's K/V staged row-major,
# B fragments by ldmatrix; the 7B down GEMV's 3 stages by default). Old = the call-1 build
# e455c0d (stage/old). Flash tests on CUDA; kernel bench of the prefill attention, old and
# new; 7B matmul tilings; prefill old against new end to end; greedy tokens old against new;
# 0.5B and 1.5B against llama.cpp in the same run (pp2048, tg128 at depths 0 and 4096);
# A/B of the 7B down GEMV's stages if time is left.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x
W=/tmp/bench-vs-llama; mkdir -p "$W"
export XDG_RUNTIME_DIR=/tmp CUBEQWEN_KERNEL_CACHE=$W/kernel-cache
t0=$SECONDS; stamp() { echo "[$((SECONDS - t0)) s] $*" | tee -a "$O/calls.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$O/calls.log"
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz stage/old/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
CQ=$B/bin-cubeqwen-bin-cubeqwen; KB=$B/bench-cubeqwen-bench-kernels; CQOLD=$B/cq-old; KBOLD=$B/bench-old
LLAMA_BENCH_BUILD=$W/llama-cpp bash stage/anchors/llama-bench.sh stage/anchors/llama-cpp.tgz > "$W/prebuild.log" 2>&1 &
bp=$!
( for s in 0.5b 1.5b 7b; do $CQ random-gguf --shape $s --tokenizer-from stage/tokenizer.gguf "$W/random-$s.gguf.part" > /tmp/x/gguf-$s.log 2>&1 && mv "$W/random-$s.gguf.part" "$W/random-$s.gguf"; done ) &
gp=$!
# 1. Flash tests on CUDA (f64 reference; 0.5B, 1.5B, 7B heads; splits; depth).
( export CUBEQWEN_TEST_DEVICE=cuda CUBEQWEN_FULL_SHAPES=1; cd kernels && timeout 150 $B/test-kernels-test-flash --test-threads=1 --include-ignored --nocapture ) > /tmp/x/t-flash.log 2>&1
echo "rc $?" >> /tmp/x/t-flash.log
stamp "flash tests: $(grep -E '^rc|test result' /tmp/x/t-flash.log | tr '\n' ' ')"
# 2. Kernel bench: prefill attention, old and new binary; 7B matmul tilings.
for v in old new; do
  k=$KB; [ $v = old ] && k=$KBOLD
  CUBEQWEN_FULL_SHAPES=1 CUBEQWEN_BENCH_JSON=/tmp/x/kb-attn-$v.jsonl timeout 60 $k --bench 'attention/prefill[0-9]+/flash mma' > /tmp/x/kb-attn-$v.log 2>&1
  stamp "kernel bench attention $v rc=$?"
done
CUBEQWEN_BENCH_TILINGS="pm=4,pn=4,sm=2,sn=4,pk=4;pm=4,pn=8,sm=2,sn=2,pk=4;pm=8,pn=4,sm=2,sn=2,pk=4;pm=4,pn=8,sm=2,sn=4,pk=4;pm=8,pn=4,sm=4,sn=2,pk=4;tiles=8,rows=1,pk=4" \
  CUBEQWEN_FULL_SHAPES=1 CUBEQWEN_BENCH_JSON=/tmp/x/kb-tilings-7b.jsonl timeout 150 $KB --bench 'matmul/7B (q|gate|down)/m2048/(auto|cublas|tma)' > /tmp/x/kb-tilings-7b.log 2>&1
stamp "kernel bench 7B tilings rc=$?"
stamp "waiting for the files and llama"; wait $gp; wait $bp; stamp "files and llama build done"
# 3. Prefill end to end, old against new, alternated (0.5B, 1.5B; pp2048 at depth 0 and 4096).
bench() { local name=$1; shift; echo "=== $name" >> "$O/ab.md"; env "$@" 2>>/tmp/x/ab.err | grep -E "^\| random" >> "$O/ab.md"; }
for i in 1 2; do
  for v in old new; do
    c=$CQ; [ $v = old ] && c=$CQOLD
    for s in 0.5b 1.5b; do bench "$s $v r$i" $c bench --model $W/random-$s.gguf -p 2048 -n 0 -d 0,4096 -r 3; done
  done
  stamp "prefill ab round $i"
done
# 4. Greedy tokens, old against new (1400-token prompt: one 2048-token chunk; the same mma ops on the same fragments).
P="$(python3 -c 'print(" ".join(str(i) for i in range(700)))')"
for s in 0.5b 1.5b; do
  for v in old new; do c=$CQ; [ $v = old ] && c=$CQOLD; timeout 60 $c generate --model $W/random-$s.gguf --prompt "$P" --max-tokens 32 --format json > /tmp/x/gen-$s-$v.json 2>/tmp/x/gen-$s-$v.err; done
  python3 -c "
import json; a=json.load(open('/tmp/x/gen-$s-old.json'))['tokens']; b=json.load(open('/tmp/x/gen-$s-new.json'))['tokens']
print('greedy $s tokens after a 1400-token prompt, old vs new flash:', 'equal' if a==b else 'differ', len(a), len(b))" 2>&1 | tee -a "$O/calls.log"
done
# 5. 0.5B and 1.5B against llama.cpp, same run.
PROMPT=2048 DEPTHS=0,4096 SWEEP= REPS=3 bash scripts/bench-vs-llama.sh gpu > /tmp/x/bvl-out.log 2>&1
stamp "bench-vs-llama 0.5b 1.5b rc=$?"
# 6. 7B: the down GEMV at 3 stages (default now) against 2, if time is left.
for st in 2 3; do
  [ $((SECONDS - t0)) -lt 500 ] || break
  bench "7b gemv stages $st" CUBEQWEN_GEMV_STAGES=$st $CQ bench --model $W/random-7b.gguf -p 0 -n 128 -d 0 -r 3
  stamp "7b gemv stages $st"
done
stamp end
cat "$O/ab.md"; grep -hE "^\| (attention|matmul) " /tmp/x/kb-attn-old.log /tmp/x/kb-attn-new.log /tmp/x/kb-tilings-7b.log | cut -c1-170; cat "$O/bench-vs-llama.md"
grep -E "rel_err|test result|panicked" /tmp/x/t-flash.log | cut -c1-160 | tail -40
cp -r $W/results /tmp/x/bvl-results 2>/dev/null
rm -f "$O"/*.png
tar czf "$O/extra.tgz" --exclude="*.ncu-rep" -C /tmp x; ls -la "$O"
