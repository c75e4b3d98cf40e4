#!/usr/bin/env python3
"""Per-kernel launches and mean GPU time (µs) from ncu's CSV, as a markdown table.

On the GPU machine (ncu's time, not the graph's: each kernel is replayed on its own):
  CUBEQWEN_NO_PDL=1 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
      cubeqwen bench --random 0.5b -p 0 -n 3 -d 0 -r 1 > ncu.csv
Here: python3 scripts/ncu_summary.py ncu.csv [more.csv ...]
"""
import collections
import csv
import sys

for path in sys.argv[1:]:
    rows=[r for r in csv.reader(open(path)) if len(r)>10]
    h=rows[0]; rows=rows[1:]
    ki=h.index('Kernel Name'); mi=h.index('Metric Name'); vi=h.index('Metric Value')
    d=collections.defaultdict(list)
    for r in rows:
        if r[mi]=='gpu__time_duration.sum':
            d[r[ki].split('(')[0][:48]].append(float(r[vi].replace(',',''))/1000)
    print(f"## {path.split('/')[-1]}\n\n| kernel | launches | mean µs |\n|---|---:|---:|")
    for k,l in sorted(d.items(), key=lambda x:-sum(x[1])):
        print(f"| {k} | {len(l)} | {sum(l)/len(l):.2f} |")
    print()
