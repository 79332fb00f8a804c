"""Results of one evaluation: config hash, results.json + results.md, one CSV row, and the paper's tables.

Plain Python (json, csv, hashlib); no torch, Hydra or Lightning. ``evaluate.py`` calls:

    config_hash(cfg)                     -> 12 hex chars identifying the resolved evaluation config
    write_results(out_dir, results)      -> (results.json, results.md), both written atomically
    append_results_csv(csv_path, row)    -> one row per evaluation in a shared CSV (header widened as needed)
    flatten_results(results)             -> that row
    compare_table(name, ours)            -> the paper's rows and ours, as markdown
    report_results(results, out_dir, csv_path, compare) -> all of the above, and the table on stdout

``results`` has this shape (every key but ``task`` and ``metrics`` optional)::

    {"task": "recon" | "generation" | "fid", "checkpoint": str | None, "config_hash": str,
     "data": {"name", "split", "resolution", "description"},
     "sampler": {"name", "steps", "cfg_scale", "eta"} | None, "seed": int,
     "extractor": {"name", ...}, "metrics": {name: float | {"mean": float, "std": float}},
     "timing": {"seconds", "seconds_per_1000_images"}, "n_images": int}

``python -m ldm.report results.csv`` renders the CSV as a markdown table and a plot (ldm/report.py).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ldm.atomic import atomic_write_text

log = logging.getLogger("ldm.evaluate")

# Keys dropped (at any depth) before hashing a config: where the outputs go and how fast they are made,
# not what is measured. Everything else (checkpoint, data, sampler, steps, seed, precision, batch size,
# extractor, number of images...) changes the hash.
VOLATILE_KEYS = frozenset({"out_dir", "output_dir", "paths", "hydra", "device", "num_workers", "progress", "results_csv"})

# Columns put first in the results CSV, in this order; the rest follow in order of first appearance.
KEY_COLUMNS: tuple[str, ...] = (
    "checkpoint", "config_hash", "task", "data", "split", "sampler", "steps", "cfg_scale", "seed",
    "extractor", "n_images",
)

# Metrics computed on the features of a network: their value depends on which one, so reports name it.
FEATURE_METRICS = frozenset({"fid", "rfid", "kid", "is", "inception_score", "precision", "recall", "fd"})

CITATION = "LDM paper (Rombach et al. 2022, arXiv 2112.10752)"
NOT_COMPARABLE = (
    "Numbers measured on different data or with a different feature extractor are not comparable as such: "
    "the paper's rows are beside ours for orientation, not as a like-for-like comparison."
)

# The paper's numbers exactly as in DESIGN.md ("Reference numbers"); nothing else is filled in.
PAPER_TABLES: dict[str, dict[str, Any]] = {
    "ldm_table8": {
        "title": "Table 8: KL autoencoders trained on OpenImages, evaluated on ImageNet-val 256²",
        "data": "ImageNet-val 256²",
        "extractor": "Inception-v3",
        # (column header, metric key in our results)
        "columns": [("rFID", "rfid"), ("PSNR", "psnr"), ("SSIM", "ssim")],
        "rows": [
            {"model": "KL f4 c3", "f": 4, "c": 3, "rfid": 0.27, "psnr": 27.53, "ssim": 0.82},
            {"model": "KL f8 c4", "f": 8, "c": 4, "rfid": 0.90, "psnr": 24.19, "ssim": 0.69},
            {"model": "KL f16 c16", "f": 16, "c": 16, "rfid": 0.87, "psnr": 24.08, "ssim": 0.68},
            {"model": "KL f32 c64", "f": 32, "c": 64, "rfid": 2.04, "psnr": 22.27, "ssim": 0.61},
        ],
    },
    "ldm_table2": {
        "title": "Table 2: text-to-image on MS-COCO 256²",
        "data": "MS-COCO 256²",
        "extractor": "Inception-v3",
        "columns": [("guidance", "guidance"), ("FID", "fid")],
        "rows": [
            {"model": "LDM-KL-8", "guidance": "none", "fid": 23.31},
            {"model": "LDM-KL-8-G", "guidance": "CFG 1.5, 250 DDIM steps", "fid": 12.63},
        ],
    },
}


def _plain(obj: Any) -> Any:
    """Mappings -> dicts, sequences -> lists, recursively (also for OmegaConf containers, without importing it)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, str | bytes):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):  # numpy scalar, 0-d tensor
        return obj.item()
    return obj


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None, so the file is strict JSON (readable by jq, JavaScript...)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def format_value(v: Any) -> str:
    """A number for a table: 2 decimals from 1 up (27.53), 4 significant digits below (0.8234, 0.001234, 0.90)."""
    v = _plain(v)
    if v is None or v == "":
        return "—"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    s = f"{v:.4g}"
    return f"{v:.2f}" if "e" not in s and len(s.partition(".")[2]) < 2 else s  # 0.9 -> 0.90, like 1.00


def _short(v: Any) -> str:
    """Settings rather than measurements: 3 not 3.00, 1.5 not 1.50."""
    return f"{v:g}" if isinstance(v, int | float) and not isinstance(v, bool) else str(v)


def format_metric(m: Any) -> str:
    """``float`` -> "0.8234"; ``{"mean", "std"}`` -> "27.53 ± 1.92"; other dicts -> their mean if any."""
    if isinstance(m, Mapping):
        if "mean" in m and m.get("std") is not None:
            std = m["std"]
            if isinstance(m["mean"], int | float) and isinstance(std, int | float) and abs(std) <= 1e-9 * max(
                    abs(m["mean"]), 1e-30):
                std = 0.0  # rounding noise of a spread that is 0 (e.g. KID of 1000 images: one subset)
            return f"{format_value(m['mean'])} ± {format_value(std)}"
        return format_value(m.get("mean"))
    return format_value(m)


def metric_mean(m: Any) -> Any:
    return m.get("mean") if isinstance(m, Mapping) else m


def is_feature_metric(name: str) -> bool:
    """fid, kid, is, rfid... (also with a suffix: ``fid_50k``, ``kid_std``)."""
    base = name.lower().split("_")[0].split("@")[0]
    return name.lower() in FEATURE_METRICS or base in FEATURE_METRICS


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _drop_volatile(obj: Any, volatile: frozenset[str]) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_volatile(v, volatile) for k, v in obj.items() if k not in volatile}
    if isinstance(obj, list):
        return [_drop_volatile(v, volatile) for v in obj]
    return obj


def config_hash(cfg: Mapping[str, Any], volatile: Iterable[str] = VOLATILE_KEYS) -> str:
    """12 hex chars of sha256 over the canonical JSON of a resolved config (a plain or OmegaConf mapping).

    Canonical: keys sorted, no whitespace, keys in ``volatile`` (default :data:`VOLATILE_KEYS`) removed at
    every depth, non-JSON values (paths...) as their ``str``. Two runs with the same hash measured the same
    thing, so their rows in a results CSV can be averaged or deduplicated.
    """
    plain = _drop_volatile(_plain(cfg), frozenset(volatile))
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _describe_data(data: Mapping[str, Any] | None) -> str:
    if not data:
        return "—"
    if data.get("description"):
        return str(data["description"])
    parts = [str(data[k]) for k in ("name", "split") if data.get(k)]
    if data.get("resolution"):
        parts.append(f"{data['resolution']}²")
    return " ".join(parts) or "—"


def _describe_sampler(sampler: Mapping[str, Any] | None) -> str:
    if not sampler:
        return "—"
    parts = [str(sampler.get("name", "?"))]
    for key in ("steps", "cfg_scale", "eta"):
        if sampler.get(key) is not None:
            parts.append(f"{key} {_short(sampler[key])}")
    return ", ".join(parts)


def results_markdown(results: Mapping[str, Any]) -> str:
    """results.md: what was evaluated (a short list), then one table row per metric."""
    extractor = (results.get("extractor") or {}).get("name")
    timing = results.get("timing") or {}
    info = [
        ("task", results.get("task")),
        ("checkpoint", results.get("checkpoint")),
        ("config hash", results.get("config_hash")),
        ("data", _describe_data(results.get("data"))),
        ("sampler", _describe_sampler(results.get("sampler"))),
        ("seed", results.get("seed")),
        ("feature extractor", extractor),
        ("images", results.get("n_images")),
        ("time", f"{format_value(timing['seconds'])} s" if timing.get("seconds") is not None else None),
        ("s / 1000 images", format_value(timing.get("seconds_per_1000_images"))
         if timing.get("seconds_per_1000_images") is not None else None),
    ]
    lines = [f"# Evaluation: {results.get('task', '?')}", ""]
    lines += [f"- {k}: {v if isinstance(v, str) else format_value(v)}" for k, v in info if v is not None]
    rows = [
        (name, format_metric(m), (extractor or "unnamed") if is_feature_metric(name) else "")
        for name, m in (results.get("metrics") or {}).items()
    ]
    lines += ["", _md_table(["metric", "value", "features"], rows), ""]
    if any(is_feature_metric(n) for n in results.get("metrics") or {}):
        lines.append(f"FID/KID/IS here use {extractor or 'an unnamed extractor'}'s features; values computed "
                     "with another feature extractor are on another scale and not comparable.")
        lines.append("")
    return "\n".join(lines)


def write_results(out_dir: str | os.PathLike, results: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``out_dir/results.json`` (the dict, NaN -> null) and ``out_dir/results.md``; both atomically."""
    out = Path(out_dir)
    plain = _json_safe(_plain(results))
    json_path = atomic_write_text(out / "results.json", json.dumps(plain, indent=2, default=str) + "\n")
    md_path = atomic_write_text(out / "results.md", results_markdown(plain))
    return json_path, md_path


def flatten_results(results: Mapping[str, Any]) -> dict[str, Any]:
    """A results dict -> one flat CSV row.

    ``data.name`` -> ``data``, ``data.split`` -> ``split``, ``sampler.name`` -> ``sampler``, the other
    sampler fields by their names (``steps``, ``cfg_scale``, ``eta``), ``extractor.name`` -> ``extractor``
    (other extractor fields -> ``extractor_<key>``), ``metrics.psnr = {"mean", "std"}`` -> ``psnr``,
    ``psnr_std`` (other stats -> ``psnr_<stat>``), timing fields by their names; other top-level scalars as
    they are, other nested dicts joined with ``_``.
    """
    results = _plain(results)
    row: dict[str, Any] = {}
    for key, value in results.items():
        if key in ("data", "sampler", "extractor") and isinstance(value, dict):
            for k, v in value.items():
                if k == "name":
                    row[key] = v
                elif key == "data" and k == "split":
                    row["split"] = v
                elif key == "data" and k == "description":
                    row["data_description"] = v
                elif key == "sampler" or (key == "data" and k == "resolution"):
                    row[k] = v
                else:
                    row[f"{key}_{k}"] = v
        elif key == "sampler":  # None: recon / fid tasks
            continue
        elif key == "metrics":
            for name, m in (value or {}).items():
                if isinstance(m, dict):
                    row[name] = m.get("mean")
                    row.update({f"{name}_{k}": v for k, v in m.items() if k != "mean"})
                else:
                    row[name] = m
        elif key == "timing" and isinstance(value, dict):
            row.update(value)
        elif isinstance(value, dict):
            row.update({f"{key}_{k}": v for k, v in value.items()})
        else:
            row[key] = value
    return row


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)
    return str(v)


def _csv_text(header: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(header), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_cell(r.get(k)) for k in header})
    return buf.getvalue()


def append_results_csv(csv_path: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Append one evaluation (a :func:`flatten_results` row) to ``csv_path``.

    A new file gets the header :data:`KEY_COLUMNS` + the row's other columns. When the row brings columns
    the file lacks, the whole file is rewritten atomically with the union header (old rows keep their
    values, new cells empty); otherwise the row is appended. ``None`` is written as an empty cell.
    """
    path = Path(csv_path)
    row = dict(row)
    if not path.exists() or path.stat().st_size == 0:
        header = list(KEY_COLUMNS) + [k for k in row if k not in KEY_COLUMNS]
        atomic_write_text(path, _csv_text(header, [row]))
        return
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        new = [k for k in row if k not in header]
        old_rows = list(reader) if new else None
    if new:
        atomic_write_text(path, _csv_text(header + new, [*old_rows, row]))
        return
    with path.open("a", newline="", encoding="utf-8") as f:
        f.write(_csv_text(header, [row]).split("\n", 1)[1])


def _ours_label(ours: Mapping[str, Any]) -> str:
    if ours.get("label"):
        return str(ours["label"])
    ckpt = ours.get("checkpoint")
    return f"ours ({Path(str(ckpt)).parent.parent.name or Path(str(ckpt)).name})" if ckpt else "ours"


def _ours_cell(ours: Mapping[str, Any], key: str) -> str:
    metrics = ours.get("metrics", ours)
    if key == "guidance":
        s = ours.get("sampler") or {}
        if not s:
            return "—"
        cfg = s.get("cfg_scale")
        g = "none" if cfg is None or cfg == 1 else f"CFG {_short(cfg)}"
        return f"{g}, {s['steps']} {str(s.get('name', '')).upper()} steps" if s.get("steps") else g
    if key == "rfid" and "rfid" not in metrics:
        key = "fid"  # a recon evaluation may call the FID of reconstructions plain "fid"
    return format_metric(metrics.get(key))


def compare_table(name: str, ours: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """Markdown: the paper's table ``name`` (a key of :data:`PAPER_TABLES`) with our row(s) beneath.

    ``ours`` is a results dict (or a list of them; a flat ``{metric: value}`` dict also works). Every row
    names its data and feature extractor, and a note says that rows on other data/extractors are not
    comparable as such.
    """
    if name not in PAPER_TABLES:
        raise ValueError(f"unknown paper table {name!r}; choose one of {sorted(PAPER_TABLES)}")
    table = PAPER_TABLES[name]
    ours_list = [ours] if isinstance(ours, Mapping) else list(ours)
    header = ["model", "source", "data", "features"] + [h for h, _ in table["columns"]]
    rows = [
        [r["model"], "LDM paper", table["data"], table["extractor"]]
        + [f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for _, k in table["columns"]]  # as printed
        for r in table["rows"]
    ]
    for o in ours_list:
        extractor = (o.get("extractor") or {}).get("name")
        rows.append(
            [_ours_label(o), "ours", _describe_data(o.get("data")), f"{extractor} features" if extractor else "—"]
            + [_ours_cell(o, k) for _, k in table["columns"]]
        )
    return "\n".join([
        f"**{table['title']}** — paper rows from the {CITATION}.",
        "",
        _md_table(header, rows),
        "",
        f"Note: {NOT_COMPARABLE}",
        "",
    ])


def report_results(results: dict[str, Any], out_dir: Path, results_csv: str | None, compare: str | None) -> None:
    """results.json + results.md in out_dir, one row in the results CSV, and the table on stdout."""
    _, md_path = write_results(out_dir, results)
    if results_csv:
        append_results_csv(results_csv, flatten_results(results))
    text = md_path.read_text()
    if compare is not None:
        table = compare_table(compare, results)
        (out_dir / f"compare_{compare}.md").write_text(table)
        text += "\n" + table
    print(text, flush=True)
    log.info("results: %s (and results.json); row appended to %s", md_path, results_csv)
