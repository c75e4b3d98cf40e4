#!/usr/bin/env bash
# Session 2026-11-29b, call 3: build v2 (the flash kernel double-buffered with cp.async, __expf,
# one FMA a probability) against llama.cpp in the same run: 0.5B and 1.5B, pp2048 and tg128 at
# depth 0 and 4096 (scripts/bench-vs-llama.sh's defaults, no decode sweep).
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O"
SWEEP= bash scripts/bench-vs-llama.sh gpu > "$O/bvl-stdout.log" 2>&1; echo "rc $?" >> "$O/bvl-stdout.log"
tail -30 "$O/bvl-stdout.log"
ls -la "$O"
