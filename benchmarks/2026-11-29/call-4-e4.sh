#!/usr/bin/env bash
# Session 2026-11-29, call 4: greedy tokens of the flash kernel before (e455c0d) and after
# (43cd942), each binary with its own kernel cache (call 2's comparison shared one), 0.5B and
# 1.5B random weights, a 2689-token prompt (chunks of 2048 and 641 tokens), 48 tokens.
set -u
R=$(pwd); O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/x; W=/tmp/w; mkdir -p $W
export XDG_RUNTIME_DIR=/tmp
B=$R/stage/run; mkdir -p $B
for f in stage/bin/*.gz stage/old/*.gz; do gunzip -c "$f" > "$B/$(basename "$f" .gz)"; chmod +x "$B/$(basename "$f" .gz)"; done
declare -A CQ=([old]=$B/cq-old [new]=$B/bin-cubeqwen-bin-cubeqwen)
P="$(python3 -c 'print(" ".join(str(i) for i in range(700)))')"
for s in 0.5b 1.5b; do
  ${CQ[new]} random-gguf --shape $s --tokenizer-from stage/tokenizer.gguf "$W/random-$s.gguf" > /dev/null 2>&1
  for v in old new; do CUBEQWEN_KERNEL_CACHE=$W/cache-$v timeout 60 ${CQ[$v]} generate --model $W/random-$s.gguf --prompt "$P" --max-tokens 48 --format json > /tmp/x/gen-$s-$v.json 2>/tmp/x/gen-$s-$v.err; done
  python3 -c "
import json; a=json.load(open('/tmp/x/gen-$s-old.json'))['tokens']; b=json.load(open('/tmp/x/gen-$s-new.json'))['tokens']
print('greedy $s, 48 tokens after a 2689-token prompt, flash before vs after (own caches):', 'equal' if a==b else 'differ', len(a), len(b), a[:8])" 2>&1 | tee -a "$O/greedy.txt"
done
tail -1 /tmp/x/gen-*.err | tee -a "$O/greedy.txt"
