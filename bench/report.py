"""Writing results: results.json, results.md, a log-log plot, and the summary of the bars.

`python -m bench.report DIR [DIR ...]` renders DIR/results.md and DIR/results.png again from
DIR/results.json; with several DIRs, it merges their records (runs of other cases on the same
machine) into the first, keeping each run's command in the header.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys

from . import curvature_report  # one way: it needs only `formatting`, never this module
from . import formatting as F


def case_tables(records: list[dict]) -> str:
    lines = []
    for case in dict.fromkeys(r["case"] for r in records):
        rows = [r for r in records if r["case"] == case]
        lines += [f"### {case} ({rows[0]['n_params']:,} parameters)", "",
                  "| method | median | spread (IQR) | compile | vs reference | vs grad | rel. err | ok | peak |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            err = r["rel_err"] if r["rel_err_exact"] is None else max(r["rel_err"] or 0, r["rel_err_exact"])
            ok = "" if r["ok"] is None else ("✓" if r["ok"] else "✗ over tolerance")
            peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f} MiB"
            lines.append(f"| {r['method']} | {F.fmt_s(r['median_s'])} | {F.fmt_s(r['spread_s'])} | "
                         f"{F.fmt_s(r['compile_s'])} | {F.fmt(r['ratio_vs_reference'], '.3f')} | "
                         f"{F.fmt(r['ratio_vs_grad'], '.2f')} | {F.fmt(err, '.1e')} | {ok} | {peak} |")
        lines.append("")
    return "\n".join(lines)


def _get(records, case, method):
    for r in records:
        if r["case"] == case and r["method"] == method:
            return r
    return None


def bars(records: list[dict]) -> list[tuple[str, float | None, str, bool | None]]:
    """The figures the issues ask for: (what, measured, bar, met)."""
    out = []

    def add(what, value, bar, met):
        out.append((what, value, bar, met))

    for r in records:
        if r["method"] == "jhvp_fwd_rev" and r["n_params"] > 1e4:
            v = r["ratio_vs_reference"]
            add(f"jhvp fwd_rev / reference, {r['case']}", v, "<= 1.05", v <= 1.05)
    r = _get(records, "rosenbrock-1e2", "jhvp_fwd_rev")
    if r:
        add("jhvp fwd_rev / reference, rosenbrock n=100", r["ratio_vs_reference"], "<= 1.3",
            r["ratio_vs_reference"] <= 1.3)
    for case, bar in (("mlp-85k", 1.10), ("rosenbrock-1e2", 2.5)):
        r = _get(records, case, "compat_hvp")
        if r:
            add(f"compat.hvp / reference, {case}", r["ratio_vs_reference"], f"<= {bar}",
                r["ratio_vs_reference"] <= bar)
    # An Equinox model passed to jhvp as a module costs what the same model split by hand does.
    m, h = _get(records, "eqx-mlp-85k", "eqx_module"), _get(records, "eqx-mlp-85k", "eqx_partition")
    if m and h:
        v = m["median_s"] / h["median_s"]
        add("Equinox module / eqx.partition by hand, eqx-mlp-85k", v, "<= 1.05", v <= 1.05)
    on_gpu = bool(records) and records[0]["device"] == "gpu"
    c, t = _get(records, "mlp-85k", "compat_hvp"), _get(records, "mlp-85k", "torch_hvp")
    if c and t and not on_gpu:  # the >= 3x bar is stated for the CPU
        v = t["median_s"] / c["median_s"]
        add("torch.autograd.functional.hvp / compat.hvp, mlp-85k (speed-up)", v, ">= 3", v >= 3)
    # Everywhere: the layer keeps the hand-written JAX's lead over torch (within 10%).
    for case in dict.fromkeys(r["case"] for r in records if r["n_params"] >= 1e6):
        c, t = _get(records, case, "compat_hvp"), _get(records, case, "torch_hvp")
        ref = _get(records, case, "reference")
        if c and t and ref:
            v, lead = t["median_s"] / c["median_s"], t["median_s"] / ref["median_s"]
            add(f"torch hvp / compat.hvp, {case} (speed-up)", v,
                f">= 0.9 x reference's {lead:.2f}", v >= 0.9 * lead)
    rosen = [r for r in records if r["family"] == "rosenbrock"]
    largest = max(rosen, key=lambda r: r["n_params"])["case"] if rosen else None
    for case, bar in (("mlp-1.8M", 0.85), (largest, 1.10)):
        o, h = _get(records, case or "-", "jhvp_operator"), _get(records, case or "-", "jhvp_fwd_rev")
        if o and h:
            v = o["median_s"] / h["median_s"]
            add(f"HessianOperator apply / fresh jhvp.hvp, {case}", v, f"<= {bar}", v <= bar)
    # GGN and empirical Fisher products (issue #11): cheaper than H·v, about a gradient's cost.
    for r in records:
        if r["method"] == "ggn_fresh" and r["family"] in ("mlp", "transformer") \
                and r["n_params"] > 1e4 and r.get("ratio_vs_reference") is not None:
            v = r["ratio_vs_reference"]
            add(f"fresh GGN·v / fresh H·v (reference), {r['case']}", v, "<= 0.8", v <= 0.8)
    g, ref = _get(records, "mlp-1.8M", "ggn_operator"), _get(records, "mlp-1.8M", "reference")
    if g and ref:
        v = g["median_s"] / ref["median_s"]
        add("GGNOperator apply / fresh H·v (reference), mlp-1.8M", v, "<= 0.6", v <= 0.6)
    f, grad = _get(records, "mlp-85k", "fisher_operator"), _get(records, "mlp-85k", "jax_grad")
    if f and grad:
        v = f["median_s"] / grad["median_s"]
        add("FisherOperator apply / gradient (jax_grad), mlp-85k", v, "<= 1.3", v <= 1.3)
    out += curvature_report.bars(records)
    bad = [r for r in records if r.get("ok") is False]
    for r in bad:
        add(f"over tolerance: {r['method']} on {r['case']}", r["rel_err"], f"<= {r['tolerance']}", False)
    return out


def repeats_table(records: list[dict]) -> str:
    """Each bar's figure in every repeat of a `--repeat` run, with their median and range."""
    by_repeat = {}
    for r in records:
        by_repeat.setdefault(r.get("repeat", 0), []).append(r)
    rows: dict[str, list] = {}
    for i, recs in sorted(by_repeat.items()):
        figures = [(what, value, bar) for what, value, bar, _ in bars(recs)]
        # For context, no bar: each framework's lead where both were timed.
        for case in dict.fromkeys(r["case"] for r in recs):
            for a, b, what in (("torch_hvp", "reference", "torch hvp / hand-written JAX reference"),
                               ("torch_grad", "jax_grad", "torch gradient / JAX gradient")):
                ra, rb = _get(recs, case, a), _get(recs, case, b)
                if ra and rb:
                    figures.append((f"{what}, {case}", ra["median_s"] / rb["median_s"], "-"))
        for what, value, bar in figures:
            rows.setdefault((what, bar), [None] * len(by_repeat))[i] = value
    n = len(by_repeat)
    lines = ["| figure | bar | " + " | ".join(f"#{i + 1}" for i in range(n))
             + " | median | min | max | runs meeting the bar |",
             "|---|---|" + "---|" * n + "---|---|---|---|"]
    for (what, bar), values in rows.items():
        got = [v for v in values if v is not None]
        if not got:
            continue
        op, limit = (bar.split() + ["-"])[:2]
        meets = sum((v >= float(limit)) if op == ">=" else (v <= float(limit)) for v in got) \
            if limit.replace(".", "", 1).isdigit() else None
        lines.append(f"| {what} | {bar} | " + " | ".join(F.fmt(v, ".2f") for v in values)
                     + f" | {statistics.median(got):.2f} | {min(got):.2f} | {max(got):.2f} | "
                     + ("-" if meets is None else f"{meets} of {len(got)}") + " |")
    return "\n".join(lines)


def write_repeats(out_dir: str, header: dict, records: list[dict]) -> str:
    """Writes results.json (every record, tagged with its repeat) and repeats.md."""
    os.makedirs(out_dir, exist_ok=True)
    F.write_json(os.path.join(out_dir, "results.json"), header, records)
    table = repeats_table(records)
    head = F.header_list(header)
    with open(os.path.join(out_dir, "repeats.md"), "w") as fh:
        fh.write(f"# jhvp benchmark, repeated\n\n{head}\n\nThe same measurement made "
                 f"{1 + max(r.get('repeat', 0) for r in records)} times in a row, each with "
                 f"its own interleaved rounds; every figure is a ratio of medians within one "
                 f"repeat.\n\n{table}\n")
    return table


def markdown(header: dict, records: list[dict]) -> str:
    return (f"# jhvp benchmark\n\n{F.header_list(header)}\n\n## The bars\n\n"
            f"{F.bars_table(bars(records))}\n\n"
            f"## All measurements\n\nMedians of synchronised calls after warm-up; compile = first "
            f"call (tracing, compilation, set-up); ratios against the hand-written "
            f"`jax.jit(jax.jvp(jax.grad(f)))` reference and against the framework's own gradient.\n\n"
            f"{case_tables(records)}")


def figure(plt, header: dict, records: list[dict]):
    """Time vs problem size, log-log, a line per method, one panel per problem family."""
    families = [f for f in dict.fromkeys(r["family"] for r in records)]
    cols = min(len(families), 2)
    rows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    all_methods = list(dict.fromkeys(r["method"] for r in records))
    colors = F.colors(plt, all_methods)
    markers = dict(zip(all_methods, "os^vD<>phX*dP8", strict=False))
    for ax, fam in zip(axes.flat, families, strict=False):
        recs = [r for r in records if r["family"] == fam]
        for method in dict.fromkeys(r["method"] for r in recs):
            pts = sorted((r["n_params"], r["median_s"]) for r in recs if r["method"] == method)
            style = "--" if method.startswith("torch") else "-"
            ax.plot(*zip(*pts, strict=True), style, marker=markers.get(method, "o"),
                    color=colors[method], label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(fam)
        ax.set_xlabel("parameters")
        ax.set_ylabel("median time per call [s]")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"H·v on {header.get('device_kind', header.get('device'))}, {header.get('dtype')}")
    return fig


def write_all(out_dir: str, header: dict, records: list[dict], plot: bool = True) -> list[str]:
    """Writes results.json, results.md and results.png for either suite; returns notes."""
    if curvature_report.is_curvature(records):
        return curvature_report.write_all(out_dir, header, records, plot)
    return F.write_all(out_dir, header, records, markdown, figure if plot else None)


def main(argv: list[str]) -> int:
    """Re-renders (and merges) saved runs; see the module docstring."""
    if not argv:
        print(__doc__)
        return 2
    runs = []
    for d in argv:
        with open(os.path.join(d, "results.json")) as fh:
            runs.append(json.load(fh))
    header, records = dict(runs[0]["header"]), list(runs[0]["records"])
    for i, run in enumerate(runs[1:], start=2):
        header[f"command ({i})"] = run["header"]["command"]
        records += [r for r in run["records"] if _get(records, r["case"], r["method"]) is None]
    for n in write_all(argv[0], header, records):
        print("note:", n)
    print(F.bars_table(bars(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
