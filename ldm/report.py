"""Render a results CSV (one row per evaluation, written by evaluate.py) as a markdown table and a plot.

    python -m ldm.report outputs/eval/results.csv                        # FID vs steps, a line per sampler/cfg
    python -m ldm.report results.csv --x f --y rfid --group extractor    # e.g. rFID vs downsampling factor
    python -m ldm.report results.csv --y psnr --where task=recon --where data=shapes,emoji --out report/

    python -m ldm.report sweep multirun/autoencoder/2026-12-06/10-00-00   # a sweep's table (ldm.sweeps)

Writes ``<out>/<csv stem>.md`` and ``<out>/<y>_vs_<x>.png`` (``--out`` defaults to the CSV's folder). The
markdown has two tables: a summary with one row per group and one column per x value (repeated runs at the
same point averaged, "mean ± std (n=k)"), then every selected CSV row. Rows whose x or y is missing or not a
number are left out of the summary and the plot. When y is a feature metric (FID, KID, IS...) and the rows
come from several feature extractors, ``extractor`` is added to the grouping: such values are never mixed.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from ldm.atomic import atomic_write, atomic_write_text
from ldm.metrics.results import format_value, is_feature_metric

DEFAULT_GROUP = ("sampler", "cfg_scale")
Row = dict[str, str]


def read_csv(path: str | os.PathLike) -> tuple[list[str], list[Row]]:
    """(header, rows as dicts of strings)."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
        return list(reader.fieldnames or []), rows


def to_number(s: str | None) -> float | None:
    """CSV cell -> float; empty, non-numeric and NaN cells -> None (missing)."""
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _matches(cell: str, wanted: str) -> bool:
    a, b = to_number(cell), to_number(wanted)
    return a == b if a is not None and b is not None else cell == wanted.strip()


def _need(columns: Sequence[str], names: Sequence[str], what: str) -> None:
    missing = [n for n in names if n not in columns]
    if missing:
        raise ValueError(
            f"{what} column(s) {missing} not in the CSV; available columns: {', '.join(columns)}"
        )


def select_rows(columns: Sequence[str], rows: list[Row], where: Sequence[str]) -> list[Row]:
    """Keep rows matching every ``key=value`` (``key=a,b``: either; numbers compare as numbers: 1.5 == 1.50)."""
    for cond in where:
        key, sep, value = cond.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--where expects key=value, got {cond!r}")
        _need(columns, [key.strip()], "--where")
        options = value.split(",")
        rows = [r for r in rows if any(_matches(r.get(key.strip(), ""), o) for o in options)]
    return rows


def _xnorm(v: str) -> str:
    """x cells that are the same number ("50", "50.0") are the same point."""
    n = to_number(v)
    if n is None:
        return v
    return str(int(n)) if n.is_integer() and abs(n) < 1e15 else repr(n)


def _x_order(values: list[str]) -> tuple[list[str], bool]:
    """Distinct non-empty x values (normalised), numerically sorted if all are numbers, else first-seen order."""
    distinct = list(dict.fromkeys(_xnorm(v) for v in values if v != ""))
    numeric = all(to_number(v) is not None for v in distinct)
    if numeric:
        distinct.sort(key=float)
    return distinct, numeric


def _group_label(key: tuple[str, ...], y: str) -> str:
    """Legend entry: the group's values (the legend's title names the columns)."""
    return ", ".join(k if k != "" else "—" for k in key) if key else y


def _cell(points: list[Row], y: str) -> str:
    ys = [to_number(r.get(y)) for r in points]
    ys = [v for v in ys if v is not None]
    if not ys:
        return "—"
    if len(ys) == 1:
        std = to_number(points[0].get(f"{y}_std")) if len(points) == 1 else None
        return format_value(ys[0]) + (f" ± {format_value(std)}" if std is not None else "")
    return f"{format_value(statistics.fmean(ys))} ± {format_value(statistics.stdev(ys))} (n={len(ys)})"


def _unique(rows: list[Row], col: str) -> list[str]:
    return list(dict.fromkeys(r.get(col, "") for r in rows if r.get(col, "")))


def render_markdown(
    csv_path: Path, columns: Sequence[str], rows: list[Row], x: str, y: str,
    group: Sequence[str], groups: dict[tuple[str, ...], list[Row]], where: Sequence[str],
) -> str:
    xs, _ = _x_order([r.get(x, "") for r in rows])
    lines = [f"# {y} vs {x}", "", f"From `{csv_path}`: {len(rows)} row(s)"
             + (f" where {' and '.join(where)}" if where else "") + "."]
    if is_feature_metric(y):
        ext = _unique(rows, "extractor")
        lines.append(f"{y.upper()} computed with {', '.join(ext) if ext else 'an unrecorded'} features.")
    lines += ["", "| " + " | ".join([*(group or ["group"]), *(f"{x}={v}" for v in xs)]) + " |",
              "|" + "---|" * ((len(group) or 1) + len(xs))]
    for key, members in groups.items():
        cells = [_cell([r for r in members if _xnorm(r.get(x, "")) == v], y) for v in xs]
        lines.append("| " + " | ".join([*(key if group else ("all",)), *cells]) + " |")
    wanted = [*group, x, y, f"{y}_std", "extractor", "data", "split", "n_images", "seed", "config_hash"]
    cols = [c for c in dict.fromkeys(wanted) if c in columns and any(r.get(c, "") for r in rows)]
    lines += ["", "All selected rows:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.get(c, "").replace("|", "\\|") for c in cols]
        cells = [format_value(to_number(v)) if c in (y, f"{y}_std") and to_number(v) is not None else v or "—"
                 for c, v in zip(cols, cells, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(
    path: Path, x: str, y: str, groups: dict[tuple[str, ...], list[Row]], group: Sequence[str],
    logx: bool = False, title: str | None = None,
) -> Path:
    """One line (with markers) per group of y over x; saved as PNG atomically. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg only

    all_rows = [r for members in groups.values() for r in members]
    xs, numeric = _x_order([r.get(x, "") for r in all_rows if to_number(r.get(y)) is not None])
    if not xs:
        raise ValueError(f"no row has both {x!r} and a numeric {y!r}; nothing to plot")
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, members in groups.items():
        px, py = [], []
        for v in xs:
            ys = [to_number(r.get(y)) for r in members if _xnorm(r.get(x, "")) == v]
            ys = [t for t in ys if t is not None]
            if ys:
                px.append(to_number(v) if numeric else xs.index(v))
                py.append(statistics.fmean(ys))
        if px:
            ax.plot(px, py, marker="o", label=_group_label(key, y))
    if numeric and logx:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right")
    elif len(xs) <= 12:
        ax.minorticks_off()  # log axes would otherwise label 2×10¹ etc. between our ticks
        ax.set_xticks([float(v) for v in xs], xs)
    ylabel = y.upper() if is_feature_metric(y) else y
    if is_feature_metric(y):
        ext = _unique(all_rows, "extractor")
        ylabel += f" ({', '.join(ext)} features)" if ext else " (extractor not recorded)"
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    data = ", ".join(d for d in dict.fromkeys(f"{r.get('data', '')} {r.get('split', '')}".strip() for r in all_rows) if d)
    name = y.upper() if is_feature_metric(y) else y
    ax.set_title(title or f"{name} vs {x}" + (f" — {data}" if data else ""))
    ax.grid(True, alpha=0.3)
    if len(groups) > 1 or group:
        ax.legend(title=", ".join(group) or None, fontsize="small")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def report(
    csv_path: str | os.PathLike, x: str = "steps", y: str = "fid", group: Sequence[str] | None = None,
    where: Sequence[str] = (), out: str | os.PathLike | None = None, logx: bool = False,
) -> tuple[Path, Path]:
    """Render ``csv_path``; returns (markdown path, PNG path). ``group=None``: ``sampler,cfg_scale`` where present.

    Raises ValueError (naming the available columns) for an unknown x / y / group / where column.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ValueError(f"no such results CSV: {csv_path}")
    columns, rows = read_csv(csv_path)
    _need(columns, [x], "--x")
    _need(columns, [y], "--y")
    if group is None:
        group = [g for g in DEFAULT_GROUP if g in columns]
    else:
        group = [g.strip() for g in group if g.strip()]
        _need(columns, group, "--group")
    rows = select_rows(columns, rows, where)
    if not rows:
        raise ValueError(f"no rows left in {csv_path} after --where {' '.join(where)}")
    if is_feature_metric(y) and len(_unique(rows, "extractor")) > 1 and "extractor" not in group:
        group = [*group, "extractor"]  # values from different feature networks must not share a line
    groups: dict[tuple[str, ...], list[Row]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(g, "") for g in group), []).append(r)
    out_dir = Path(out) if out is not None else csv_path.parent
    md = atomic_write_text(out_dir / f"{csv_path.stem}.md",
                           render_markdown(csv_path, columns, rows, x, y, group, groups, where))
    png = plot(out_dir / f"{y}_vs_{x}.png", x, y, groups, group, logx=logx)
    return md, png


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        from ldm.sweeps import main as sweep_main

        return sweep_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m ldm.report", description=__doc__.split("\n\n")[0],
                                epilog="python -m ldm.report sweep <sweep dir> --help: the summary table of a sweep")
    p.add_argument("csv", help="results CSV written by evaluate.py")
    p.add_argument("--x", default="steps", help="column on the x axis (default: steps)")
    p.add_argument("--y", default="fid", help="column on the y axis (default: fid)")
    p.add_argument("--group", default=None,
                   help="comma-separated columns, one line per distinct combination (default: sampler,cfg_scale "
                        "where present; '' for a single line)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="keep rows with this value (repeatable; KEY=a,b for either)")
    p.add_argument("--out", default=None, help="output folder (default: the CSV's folder)")
    p.add_argument("--logx", action="store_true", help="logarithmic x axis")
    args = p.parse_args(argv)
    group = None if args.group is None else args.group.split(",")
    try:
        md, png = report(args.csv, args.x, args.y, group, args.where, args.out, args.logx)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {md}\nwrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
