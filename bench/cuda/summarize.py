#!/usr/bin/env python3
"""Markdown tables from kvevict-cuda-bench's JSON (tests/cuda/run_gpu_checks.sh writes
$OUT/cuda_bench.json): each figure beside its same-run baseline, as bench/RESULTS.md records them.

  python3 bench/cuda/summarize.py gpu_out/cuda_bench.json

- Decode step: every BM_CudaStep<...>/T/d divided by BM_CudaAttentionStep/T/d (one layer) or
  BM_CudaAttentionStep8Layers/T/d (the 8-layer steps).
- Kernel profiles (BM_CudaKernels<Step>): per kernel, each step's GPU time, the step's total, its
  graph replay, and the fused steps' difference to the attention step, kernel by kernel.
- Compaction: BM_CudaCompact and BM_CudaGatherRows beside BM_CudaMemcpyD2D.
With repetitions, medians are used. Only standard-library Python 3.
"""
import json
import re
import sys
from collections import OrderedDict

ARGS = re.compile(r"^(?P<family>[^/]+)/(?P<args>T:\d+/d:\d+)")


def load(path):
    with open(path, encoding="utf-8") as f:
        runs = json.load(f)["benchmarks"]
    picked = OrderedDict()
    for r in runs:
        if r.get("error_occurred"):
            continue
        if r.get("run_type") == "aggregate" and r.get("aggregate_name") != "median":
            continue
        m = ARGS.match(r.get("run_name", r["name"]))
        if m:
            picked[(m["family"], m["args"])] = r
    return picked


def us(run):
    scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[run.get("time_unit", "ns")]
    return run["real_time"] * scale


def ratio_table(runs, out, title, base, families, arg_rows, ratio):
    """One row per args: the baseline's time, then each family's time and its ratio(t, base)."""
    out.append(f"\n### {title}\n")
    out.append(f"| args | {base} | " + " | ".join(f"{f} | ratio" for f in families) + " |")
    out.append("|---|---|" + "---|---|" * len(families))
    for a in arg_rows:
        b = us(runs[(base, a)])
        cells = []
        for f in families:
            r = runs.get((f, a))
            cells += [f"{us(r):.1f} us", f"**{ratio(us(r), b):.2f}**"] if r else ["-", "-"]
        out.append(f"| {a} | {b:.1f} us | " + " | ".join(cells) + " |")


def step_tables(runs, out):
    for base, layered in (("BM_CudaAttentionStep", False), ("BM_CudaAttentionStep8Layers", True)):
        families = [f for f in OrderedDict.fromkeys(f for (f, _) in runs)
                    if f.startswith("BM_CudaStep") and f != "BM_CudaStepAppend" and ("8Layers" in f) == layered]
        arg_rows = [a for (f, a) in runs if f == base]
        if families and arg_rows:
            ratio_table(runs, out, f"Decode step vs {base} (ratio = step / baseline)", base, families, arg_rows,
                        lambda t, b: t / b)


KERNEL_COUNTER = re.compile(r"^k(\d+)_(.+)_us$")


def kernel_tables(runs, out):
    profiles = [f for f in OrderedDict.fromkeys(f for (f, _) in runs) if f.startswith("BM_CudaKernels")]
    if not profiles:
        return
    baseline = "BM_CudaKernelsAttentionStep"
    for a in OrderedDict.fromkeys(a for (f, a) in runs if f in profiles):
        present = [f for f in profiles if (f, a) in runs]
        kernels = {f: sorted(((int(m[1]), m[2], v) for k, v in runs[(f, a)].items()
                              if (m := KERNEL_COUNTER.match(k))), key=lambda t: t[0]) for f in present}
        depth = max(len(k) for k in kernels.values())
        out.append(f"\n### Kernel by kernel, {a} (GPU time, us; each kernel alone; Δ = step - {baseline})\n")
        out.append("| # | " + " | ".join(f"{f.removeprefix('BM_CudaKernels')} kernel | us" +
                                          (" | Δ" if f != baseline and baseline in present else "")
                                          for f in present) + " |")
        out.append("|---|" + "".join("---|---|" + ("---|" if f != baseline and baseline in present else "")
                                     for f in present))

        def row(value_of):
            cells = []
            for f in present:
                v = value_of(f)
                cells += ["", "-" if v is None else f"{v:.2f}"]
                if f != baseline and baseline in present:
                    b = value_of(baseline)
                    cells.append("-" if v is None or b is None else f"{v - b:+.2f}")
            return cells

        for i in range(depth):
            cells = []
            for f in present:
                k = kernels[f][i] if i < len(kernels[f]) else None
                cells += [k[1] if k else "-", f"{k[2]:.2f}" if k else "-"]
                if f != baseline and baseline in present:
                    b = kernels[baseline][i] if i < len(kernels[baseline]) else None
                    cells.append(f"{k[2] - b[2]:+.2f}" if k and b else "-")
            out.append(f"| {i} | " + " | ".join(cells) + " |")
        for label, counter in (("sum of kernels", "sum_kernels_us"), ("step (queued)", "gpu_step_us"),
                               ("graph replay", "graph_us")):
            out.append(f"| {label} | " + " | ".join(row(lambda f, c=counter: runs[(f, a)].get(c))) + " |")


def compaction_table(runs, out):
    base = "BM_CudaMemcpyD2D"
    arg_rows = [a for (f, a) in runs if f == base]
    families = [f for f in ("BM_CudaCompact", "BM_CudaGatherRows") if any((f, a) in runs for a in arg_rows)]
    if families:
        ratio_table(runs, out, f"Compaction vs {base} (ratio = memcpy time / time: bandwidth ratio)", base, families,
                    arg_rows, lambda t, b: b / t)


def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__)
    runs = load(argv[1])
    out = []
    step_tables(runs, out)
    kernel_tables(runs, out)
    compaction_table(runs, out)
    print("\n".join(out) if out else "no decode-step, kernel-profile or compaction results in " + argv[1])


if __name__ == "__main__":
    main(sys.argv)
