#!/usr/bin/env python3
"""Tables and PNG plots from recorded benchmark JSON.

  plot_bench.py compare DIR --out FILE.json [--md FILE.md] [--gpu TEXT]
      Merges `cubeqwen bench --format json` results (DIR/cubeqwen-SHAPE[-PART].json) and
      `llama-bench -o json` results (DIR/llama-SHAPE[-PART].json) of the same GGUF files into one
      JSON object {gpu, shapes: {SHAPE: {cubeqwen: {meta, tests}, llama.cpp: {meta, tests}}}}
      and prints the markdown table test | cubeqwen | llama.cpp | ratio. Parts (a main run and a
      decode depth sweep, say) are joined.
  plot_bench.py depth FILE.json --out DIR
      decode (and prefill) tok/s against context depth, cubeqwen and llama.cpp per shape, with
      cubeqwen's bandwidth floor: DIR/decode-vs-depth.png.
  plot_bench.py kernels FILE.jsonl --out DIR [--md]
      The kernel benches' records (one JSON object a line, written to $CUBEQWEN_BENCH_JSON:
      {group, variant, shape, m, n, k, tokens, seconds, gbps, tflops, ceiling_ratio, device})
      as one PNG per group, variant against variant per shape: DIR/kernels-GROUP.png; --md also
      prints one markdown table per group.

`compare` needs only the standard library; the plots need matplotlib.
"""
import argparse
import json
import math
import os
import sys


def test_name(n_prompt, n_gen, n_depth):
    """llama-bench's test name: pp512, tg128, pp512 @ d4096."""
    base = f"pp{n_prompt}" if n_prompt > 0 else f"tg{n_gen}"
    return f"{base} @ d{n_depth}" if n_depth > 0 else base


def key(r):
    return (int(r["n_prompt"]), int(r["n_gen"]), int(r["n_depth"]))


def load_json(path):
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        sys.exit(f"plot_bench: {path} is not JSON ({e})")


def engine_records(paths, engine):
    """Test records {n_prompt, n_gen, n_depth, avg_ts, stddev_ts, samples_ts[, floor_ts]} from
    cubeqwen reports (engine "cubeqwen") or llama-bench arrays (engine "llama"), joined; the
    first file's metadata is kept."""
    records, meta = {}, None
    for p in paths:
        if not p or not os.path.exists(p) or os.path.getsize(p) == 0:
            print(f"plot_bench: {engine} results {p!r} missing", file=sys.stderr)
            continue
        v = load_json(p)
        tests = v["tests"] if engine == "cubeqwen" else v
        if meta is None:
            meta = {k: x for k, x in v.items() if k != "tests"} if engine == "cubeqwen" else (
                {k: v[0].get(k) for k in ("build_commit", "model_type", "model_size", "gpu_info",
                                           "backends", "n_batch", "n_ubatch", "flash_attn")}
                if v else {})
        for t in tests:
            keep = ("n_prompt", "n_gen", "n_depth", "avg_ts", "stddev_ts", "samples_ts", "floor_ts")
            records[key(t)] = {k: t[k] for k in keep if k in t}
    return meta, [records[k] for k in sorted(records, key=lambda k: (k[2], k[1] > 0, k[0], k[1]))]


def fmt_ts(r):
    return f"{r['avg_ts']:.1f} ± {r['stddev_ts']:.1f}" if r else "—"


def shape_files(directory):
    """{shape: {"cubeqwen": [paths], "llama": [paths]}} from DIR/ENGINE-SHAPE[-PART].json."""
    found = {}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        engine, _, rest = name[:-5].partition("-")
        if engine not in ("cubeqwen", "llama") or not rest:
            continue
        shape = rest.split("-")[0]
        found.setdefault(shape, {"cubeqwen": [], "llama": []})[engine].append(os.path.join(directory, name))

    def size(shape):
        try:
            return float(shape.rstrip("bB"))
        except ValueError:
            return math.inf
    return dict(sorted(found.items(), key=lambda kv: (size(kv[0]), kv[0])))


def compare(args):
    files = shape_files(args.dir)
    if not files:
        sys.exit(f"plot_bench compare: no cubeqwen-SHAPE*.json or llama-SHAPE*.json in {args.dir}")
    merged = {"gpu": args.gpu, "shapes": {}}
    for shape, paths in files.items():
        # The main run first, so its metadata is kept.
        cq_meta, cq = engine_records(sorted(paths["cubeqwen"], key=len), "cubeqwen")
        ll_meta, ll = engine_records(sorted(paths["llama"], key=len), "llama")
        merged["shapes"][shape] = {"cubeqwen": {"meta": cq_meta, "tests": cq},
                                   "llama.cpp": {"meta": ll_meta, "tests": ll}}
    with open(args.out, "w") as f:
        json.dump(merged, f, indent=1)
    md = table(merged)
    print(md, end="")
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)


def table(merged):
    lines = []
    if merged.get("gpu"):
        lines.append(f"GPU: {merged['gpu']}\n")
    lines.append("| model | test | cubeqwen t/s | llama.cpp t/s | ratio | cubeqwen floor t/s |")
    lines.append("| --- | --- | ---: | ---: | ---: | ---: |")
    for shape, eng in merged["shapes"].items():
        cq = {key(r): r for r in eng["cubeqwen"]["tests"]}
        ll = {key(r): r for r in eng["llama.cpp"]["tests"]}
        for k in sorted(set(cq) | set(ll), key=lambda k: (k[1] > 0, k[0], k[1], k[2])):
            a, b = cq.get(k), ll.get(k)
            ratio = f"{a['avg_ts'] / b['avg_ts']:.3f}" if a and b and b["avg_ts"] > 0 else "—"
            floor = f"{a['floor_ts']:.0f}" if a and a.get("floor_ts") else ""
            lines.append(f"| {shape} | {test_name(*k)} | {fmt_ts(a)} | {fmt_ts(b)} | {ratio} | {floor} |")
        bw = (eng["cubeqwen"]["meta"] or {}).get("copy_bandwidth", {}).get("best_gbps")
        if bw:
            lines.append(f"| {shape} | copy bandwidth (floor's ceiling) | {bw:.1f} GB/s | | | |")
    return "\n".join(lines) + "\n"


def pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("plot_bench: matplotlib is missing (python3 -m pip install matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def depth(args):
    plt = pyplot()
    merged = load_json(args.file)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (shape, eng) in enumerate(merged["shapes"].items()):
        c = colors[i % len(colors)]
        for ax, decode in ((axes[0], True), (axes[1], False)):
            for engine, style in (("cubeqwen", "-o"), ("llama.cpp", "--s")):
                rs = [r for r in eng[engine]["tests"] if (r["n_gen"] > 0) == decode]
                if not rs:
                    continue
                lengths = sorted({r["n_gen"] if decode else r["n_prompt"] for r in rs})
                for n in lengths:
                    sel = sorted((r for r in rs if (r["n_gen"] if decode else r["n_prompt"]) == n),
                                 key=lambda r: r["n_depth"])
                    label = f"{shape} {engine} {'tg' if decode else 'pp'}{n}"
                    ax.errorbar([r["n_depth"] for r in sel], [r["avg_ts"] for r in sel],
                                yerr=[r["stddev_ts"] for r in sel], fmt=style, color=c,
                                capsize=3, label=label)
                    if decode and engine == "cubeqwen" and all(r.get("floor_ts") for r in sel):
                        ax.plot([r["n_depth"] for r in sel], [r["floor_ts"] for r in sel], ":",
                                color=c, label=f"{shape} bandwidth floor")
    for ax, what in ((axes[0], "decode"), (axes[1], "prefill")):
        ax.set_xlabel("context depth (tokens already in the cache)")
        ax.set_ylabel("tokens/s")
        ax.set_yscale("log")
        ax.set_title(f"{what} tok/s against context depth")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if merged.get("gpu"):
        fig.suptitle(merged["gpu"], fontsize=10)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "decode-vs-depth.png")
    fig.savefig(path, dpi=120)
    print(path)


def kernel_records(path):
    recs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"plot_bench: {path}:{n}: not a JSON record ({e})")
    need = {"group", "variant", "shape", "seconds"}
    for n, r in enumerate(recs, 1):
        if not need <= set(r):
            sys.exit(f"plot_bench: {path}: record {n} lacks {sorted(need - set(r))}")
    return recs


def case_label(r):
    parts = [str(r["shape"])]
    if r.get("m") is not None:
        parts.append(f"m={r['m']}")
    if r.get("tokens") is not None and r.get("tokens") != r.get("m"):
        parts.append(f"tokens={r['tokens']}")
    return " ".join(parts)


def short(x):
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def num(x):
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def metric(rs):
    """(field, unit) the group is plotted in: TFLOP/s when its records have them, else GB/s."""
    if any(num(r.get("tflops")) for r in rs):
        return "tflops", "TFLOP/s"
    if any(num(r.get("gbps")) for r in rs):
        return "gbps", "GB/s"
    return "seconds", "s"


def kernels(args):
    recs = kernel_records(args.file)
    groups = {}
    for r in recs:
        groups.setdefault(r["group"], []).append(r)
    plt = None if args.md_only else pyplot()
    for group, rs in groups.items():
        cases = list(dict.fromkeys(case_label(r) for r in rs))
        variants = list(dict.fromkeys(r["variant"] for r in rs))
        field, unit = metric(rs)
        # The last record of a (case, variant) wins (a rerun appends).
        val = {(case_label(r), r["variant"]): r for r in rs}
        if args.md or args.md_only:
            print(f"\n### {group} ({unit}; in brackets: ratio to the ceiling measured in the same run)\n")
            print("| case | " + " | ".join(variants) + " |")
            print("| --- |" + " ---: |" * len(variants))
            for c in cases:
                cells = []
                for v in variants:
                    r = val.get((c, v))
                    if r is None or not num(r.get(field)):
                        cells.append("—")
                        continue
                    cell = short(r[field])
                    if num(r.get("ceiling_ratio")):
                        cell += f" ({r['ceiling_ratio']:.2f})"
                    cells.append(cell)
                print(f"| {c} | " + " | ".join(cells) + " |")
        if plt is None:
            continue
        ratio = any(num(r.get("ceiling_ratio")) for r in rs)
        fig, axes = plt.subplots(2 if ratio else 1, 1, figsize=(max(8, 0.9 * len(cases) * len(variants) ** 0.5 + 4), 8 if ratio else 4.5),
                                 squeeze=False)
        width = 0.8 / max(1, len(variants))
        for row, (f, ylabel) in enumerate([(field, unit)] + ([("ceiling_ratio", "ratio to the ceiling")] if ratio else [])):
            ax = axes[row][0]
            for j, v in enumerate(variants):
                xs, ys = [], []
                for i, c in enumerate(cases):
                    r = val.get((c, v))
                    if r is not None and num(r.get(f)):
                        xs.append(i + (j - (len(variants) - 1) / 2) * width)
                        ys.append(r[f])
                ax.bar(xs, ys, width, label=v)
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(ylabel)
            if f == "ceiling_ratio":
                ax.axhline(1.0, color="k", lw=0.8, ls=":")
            else:
                ax.set_yscale("log")  # m = 1 and m = 2048 differ by orders of magnitude
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=8)
        device = next((r.get("device") for r in rs if r.get("device")), "")
        axes[0][0].set_title(f"{group}: variant against variant per shape" + (f" ({device})" if device else ""))
        fig.tight_layout()
        os.makedirs(args.out, exist_ok=True)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in group)
        path = os.path.join(args.out, f"kernels-{safe}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        print(path, file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--out", required=True)
    c.add_argument("--md")
    c.add_argument("--gpu", default="")
    c.add_argument("dir", help="folder of cubeqwen-SHAPE[-PART].json and llama-SHAPE[-PART].json")
    d = sub.add_parser("depth")
    d.add_argument("file")
    d.add_argument("--out", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("file")
    k.add_argument("--out", default=".")
    k.add_argument("--md", action="store_true", help="also print markdown tables")
    k.add_argument("--md-only", action="store_true", help="only print markdown tables (no matplotlib)")
    args = ap.parse_args()
    {"compare": compare, "depth": depth, "kernels": kernels}[args.cmd](args)


if __name__ == "__main__":
    main()
