"""What both reports (`report`, `curvature_report`) share: number formatting, the bars table, the
header list, and writing a run's results.json, results.md and results.png.

It imports neither report, so `report` can import `curvature_report` at the top with no circle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

NO_PLOT = "matplotlib is not installed (pip install -e '.[bench]'): no plot"


def fmt_s(s) -> str:
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def header_list(header: dict, skip=()) -> str:
    """The run's header as a Markdown list, one `- key: value` a line."""
    return "\n".join(f"- {k}: {v}" for k, v in header.items() if k not in skip)


def bars_table(bars: list[tuple[str, float | None, str, bool | None]]) -> str:
    """The (what, measured, bar, met) figures as a Markdown table."""
    lines = ["| figure | measured | bar | met |", "|---|---|---|---|"]
    for what, value, bar, met in bars:
        lines.append(f"| {what} | {fmt(value, '.3f')} | {bar} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


def write_json(path: str, header: dict, records: list[dict]) -> None:
    with open(path, "w") as fh:
        json.dump({"header": header, "records": records}, fh, indent=1)


def colors(plt, names) -> dict:
    """One colour per name, the same in every panel."""
    return {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(dict.fromkeys(names))}


def write_all(out_dir: str, header: dict, records: list[dict], markdown: Callable[..., str],
              figure: Callable | None) -> list[str]:
    """Writes results.json, results.md (`markdown(header, records)`) and, unless `figure` is
    None, results.png (`figure(plt, header, records)` returns the figure); returns notes."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "results.json"), header, records)
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write(markdown(header, records))
    if figure is None:
        return []
    try:  # optional: the bench extra
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [NO_PLOT]
    fig = figure(plt, header, records)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=110)
    plt.close(fig)
    return []
