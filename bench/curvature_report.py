"""Writing the curvature suite's results: results.json, results.md, results.png, and its bars."""

from __future__ import annotations

from . import formatting as F

TASKS = {"eig5": "top-5 eigenvalues", "eig1": "top eigenvalue", "trace": "trace",
         "density": "spectral density"}
# The accuracy below which two answers count as equal (the float32 reference's own noise).
EQUAL_ERR = {"float32": 1e-5, "float64": 1e-10}


def is_curvature(records) -> bool:
    return any("task" in r for r in records)


def _get(records, case, task, method):
    return next((r for r in records if r.get("task") == task and r["case"] == case
                 and r["method"] == method), None)


def bars(records) -> list[tuple[str, float | None, str, bool | None]]:
    out = []
    j, p = _get(records, "mlp-ce-85k", "eig1", "jhvp_eigh_rtol"), \
        _get(records, "mlp-ce-85k", "eig1", "pyhessian")
    if j and p:
        v = p["total_s"] / j["total_s"]
        floor = EQUAL_ERR.get(j["dtype"], 0.0)
        accurate = j["error"] <= max(p["error"], floor)
        out.append(("PyHessian eigenvalues(maxIter=200, tol=1e-6) / jhvp eigh(k=1, rtol), "
                    "mlp-ce-85k (speed-up, time to answer)", v,
                    f">= 2.5 at equal or better error (jhvp {j['error']:.1e}, PyHessian "
                    f"{p['error']:.1e})", v >= 2.5 and accurate))
    for case, bar in (("mlp-ce-85k", 1.25), ("mlp-ce-1.8M", 1.6)):
        e, m = _get(records, case, "eig5", "jhvp_eigh"), _get(records, case, "eig5", "matvecs")
        if e and m:
            v = e["median_s"] / m["median_s"]
            out.append((f"eigh(k=5, num_matvecs=32) / 32 operator applications, {case}", v,
                        f"<= {bar}", v <= bar))
    t, loop = _get(records, "rosenbrock-1e4", "trace", "jhvp_trace"), \
        _get(records, "rosenbrock-1e4", "trace", "loop_hutchinson")
    if t and loop:
        v = t["median_s"] / loop["median_s"]
        out.append(("trace(num_matvecs=99, batch_size=33) / Python loop of 99 probes, "
                    "rosenbrock-1e4", v, "<= 0.25", v <= 0.25))
    return out


def tables(records) -> str:
    lines = []
    for case in dict.fromkeys(r["case"] for r in records):
        for task in TASKS:
            rows = [r for r in records if r["case"] == case and r["task"] == task]
            if not rows:
                continue
            lines += [f"### {case}: {TASKS[task]} ({rows[0]['n_params']:,} parameters)", "",
                      "| method | time to answer | set-up | solve | spread (IQR) | compile | "
                      "matvecs | error | answer |", "|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                ans = r.get("answer")
                if isinstance(ans, list):
                    ans = ", ".join(f"{x:.5g}" for x in ans)
                elif isinstance(ans, float):
                    ans = f"{ans:.6g}" + (f" ± {r['stderr']:.2g}" if r.get("stderr") else "")
                lines.append(
                    f"| {r['method']} | {F.fmt_s(r['total_s'])} | {F.fmt_s(r['setup_s'])} "
                    f"| {F.fmt_s(r['median_s'])} | {F.fmt_s(r['spread_s'])} | "
                    f"{F.fmt_s(r['compile_s'])} | {r['num_matvecs']} | "
                    f"{F.fmt(r['error'], '.1e')} | {ans or '-'} |")
            refs = dict.fromkeys(r["reference"] for r in rows if r.get("error") is not None)
            lines += [""] + [f"Reference: {h}." for h in refs] + [""]
    return "\n".join(lines)


def markdown(header, records) -> str:
    return (f"# jhvp curvature benchmark\n\n{F.header_list(header, skip=('notes',))}\n\n"
            + "".join(f"Note: {n}.\n\n" for n in header.get("notes", []))
            + f"## The bars\n\n{F.bars_table(bars(records))}\n\n## All measurements\n\n"
            "Time to answer = set-up (operator build, scipy wrapper, PyHessian's create-graph "
            "backward) + solve, medians over interleaved rounds; compile = the first call. "
            "Errors: eigenvalues max|λ̂−λ|/max|λ| over the k wanted; trace |t̂−t|/|t|; density "
            "the Wasserstein-1 distance to the exact spectrum over its range.\n\n"
            f"{tables(records)}")


def figure(plt, header, records):
    """Time to answer per case, a bar per method, one panel per task."""
    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.5), squeeze=False)
    colors = F.colors(plt, (r["method"] for r in records))
    for ax, task in zip(axes.flat, tasks, strict=True):
        recs = [r for r in records if r["task"] == task]
        cases = list(dict.fromkeys(r["case"] for r in recs))
        names = list(dict.fromkeys(r["method"] for r in recs))
        width = 0.8 / len(names)
        for i, m in enumerate(names):
            xs = [c + (i - (len(names) - 1) / 2) * width for c in range(len(cases))]
            ys = [next((r["total_s"] for r in recs if r["case"] == c and r["method"] == m), 0)
                  for c in cases]
            ax.bar(xs, ys, width, color=colors[m], label=m)
        ax.set_xticks(range(len(cases)), cases, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(TASKS[task])
        ax.set_ylabel("time to answer [s]")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"curvature on {header.get('device_kind', header.get('device'))}, "
                 f"{header.get('dtype')}")
    return fig


def write_all(out_dir, header, records, plot: bool = True) -> list[str]:
    return F.write_all(out_dir, header, records, markdown, figure if plot else None)
