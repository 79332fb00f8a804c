"""Results reporting: config hash, results.json/.md, the results CSV, the paper tables and `python -m ldm.report`."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ldm.metrics.results import (
    KEY_COLUMNS,
    PAPER_TABLES,
    append_results_csv,
    compare_table,
    config_hash,
    flatten_results,
    format_metric,
    write_results,
)
from ldm.report import main, report

ROOT = Path(__file__).resolve().parents[1]


def _results(**over) -> dict:
    r = {
        "task": "generation",
        "checkpoint": "outputs/ldm/run1/checkpoints/last.ckpt",
        "config_hash": "0123456789ab",
        "data": {"name": "shapes", "split": "val", "resolution": 32, "description": "shapes val 32²"},
        "sampler": {"name": "ddim", "steps": 50, "cfg_scale": 3.0, "eta": 0.0},
        "seed": 0,
        "extractor": {"name": "vgg16", "dims": 4096},
        "metrics": {"fid": 41.5, "kid": {"mean": 0.0123, "std": 0.0021}, "psnr": {"mean": 27.5312, "std": 1.25}},
        "timing": {"seconds": 12.5, "seconds_per_1000_images": 48.8},
        "n_images": 256,
    }
    r.update(over)
    return r


# ----------------------------------------------------------------------------------------- config_hash


def test_config_hash_ignores_key_order_and_volatile_keys_but_not_values():
    a = {"seed": 0, "model": {"ch": 128, "ch_mult": [1, 2, 4]}, "out_dir": "outputs/a", "device": "cuda",
         "data": {"name": "shapes", "num_workers": 4}, "paths": {"root": "/x"}, "progress": True}
    b = {"data": {"num_workers": 0, "name": "shapes"}, "progress": False, "paths": {"root": "/elsewhere"},
         "device": "cpu", "out_dir": "outputs/b", "model": {"ch_mult": [1, 2, 4], "ch": 128}, "seed": 0}
    h = config_hash(a)
    assert re.fullmatch(r"[0-9a-f]{12}", h)
    assert config_hash(b) == h
    assert config_hash({k: v for k, v in a.items() if k not in ("out_dir", "device", "paths", "progress")}) == h
    assert config_hash({**a, "seed": 1}) != h
    assert config_hash({**a, "model": {"ch": 128, "ch_mult": [1, 4, 2]}}) != h  # list order matters
    assert config_hash({**a, "data": {"name": "emoji", "num_workers": 4}}) != h


# ---------------------------------------------------------------------------------------- write_results


def test_write_results_round_trip_and_markdown(tmp_path):
    res = _results()
    json_path, md_path = write_results(tmp_path / "eval", res)
    assert json_path == tmp_path / "eval" / "results.json" and md_path.name == "results.md"
    assert json.loads(json_path.read_text()) == res
    md = md_path.read_text()
    assert "27.53 ± 1.25" in md  # psnr mean ± std
    assert "0.0123 ± 0.0021" in md  # kid
    assert re.search(r"\| fid \| 41\.50 \| vgg16 \|", md)  # the extractor is named beside FID
    assert re.search(r"\| psnr \| 27\.53 ± 1\.25 \|  \|", md)  # ... and not beside PSNR
    assert "shapes val 32²" in md and "ddim, steps 50, cfg_scale 3, eta 0" in md and "0123456789ab" in md
    assert not list(tmp_path.glob("eval/.*tmp"))  # no temporary files left behind


def test_write_results_nan_is_null_and_recon_without_sampler(tmp_path):
    res = _results(task="recon", sampler=None, metrics={"psnr": {"mean": 24.0, "std": 2.0}, "rfid": math.nan})
    json_path, md_path = write_results(tmp_path, res)
    loaded = json.loads(json_path.read_text())  # strict JSON: no NaN literal
    assert loaded["metrics"]["rfid"] is None and loaded["sampler"] is None
    assert "| rfid | — | vgg16 |" in md_path.read_text()


# ---------------------------------------------------------------------------------------- CSV


def test_format_metric_mean_and_spread():
    assert format_metric({"mean": 27.534, "std": 1.9211}) == "27.53 ± 1.92"
    assert format_metric({"mean": 0.02572, "std": 2.1e-16}) == "0.02572 ± 0"  # float noise of a zero spread
    assert format_metric({"mean": 0.02572, "std": 3e-6}) == "0.02572 ± 3e-06"  # a small real spread stays
    assert format_metric({"mean": 0.5}) == "0.50" and format_metric(0.8234) == "0.8234"


def test_flatten_results():
    row = flatten_results(_results())
    assert row["psnr"] == 27.5312 and row["psnr_std"] == 1.25 and row["fid"] == 41.5 and row["kid_std"] == 0.0021
    assert (row["data"], row["split"], row["resolution"]) == ("shapes", "val", 32)
    assert (row["sampler"], row["steps"], row["cfg_scale"], row["eta"]) == ("ddim", 50, 3.0, 0.0)
    assert row["extractor"] == "vgg16" and row["extractor_dims"] == 4096
    assert row["seconds_per_1000_images"] == 48.8 and row["n_images"] == 256
    assert "sampler" not in flatten_results(_results(sampler=None))


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_append_results_csv_creates_appends_and_widens(tmp_path):
    path = tmp_path / "sub" / "results.csv"
    append_results_csv(path, flatten_results(_results(task="recon", sampler=None, metrics={"psnr": 24.0})))
    header, rows = _read(path)
    assert tuple(header[: len(KEY_COLUMNS)]) == KEY_COLUMNS and "psnr" in header
    assert rows[0]["task"] == "recon" and rows[0]["sampler"] == "" and rows[0]["psnr"] == "24.0"

    append_results_csv(path, flatten_results(_results(task="recon", sampler=None, metrics={"psnr": 25.0})))
    header2, rows = _read(path)
    assert header2 == header and [r["psnr"] for r in rows] == ["24.0", "25.0"]

    append_results_csv(path, flatten_results(_results()))  # brings fid, kid, kid_std, psnr_std, steps...
    header3, rows = _read(path)
    assert header3[: len(header)] == header and {"fid", "kid_std", "psnr_std"} <= set(header3)
    assert len(rows) == 3 and [r["psnr"] for r in rows] == ["24.0", "25.0", "27.5312"]
    assert rows[0]["fid"] == "" and rows[2]["fid"] == "41.5" and rows[2]["steps"] == "50"
    assert not [p for p in path.parent.iterdir() if p.name != "results.csv"]


# ---------------------------------------------------------------------------------------- paper tables


def test_compare_table_table8_has_paper_numbers_and_ours():
    ours = _results(task="recon", sampler=None,
                    metrics={"rfid": 3.2, "psnr": {"mean": 25.27, "std": 2.5}, "ssim": {"mean": 0.83, "std": 0.05}})
    md = compare_table("ldm_table8", ours)
    for n in ("0.27", "27.53", "0.82", "0.90", "24.19", "0.69", "0.87", "24.08", "0.68", "2.04", "22.27", "0.61"):
        assert n in md
    assert "KL f8 c4" in md and "ImageNet-val" in md and "Inception-v3" in md and "OpenImages" in md
    assert "Rombach et al. 2022" in md
    ours_line = [line for line in md.splitlines() if "| ours" in line][0]
    assert "shapes val 32²" in ours_line and "vgg16 features" in ours_line
    assert "3.20" in ours_line and "25.27 ± 2.50" in ours_line and "0.83 ± 0.05" in ours_line
    assert "not comparable" in md


def test_compare_table_table2_and_unknown_name():
    md = compare_table("ldm_table2", _results(sampler={"name": "ddim", "steps": 250, "cfg_scale": 1.5}))
    assert "23.31" in md and "12.63" in md and "MS-COCO" in md and "CFG 1.5, 250 DDIM steps" in md
    ours_line = [line for line in md.splitlines() if "| ours" in line][0]
    assert "41.50" in ours_line and "vgg16 features" in ours_line and "CFG 1.5, 250 DDIM steps" in ours_line
    assert "not comparable" in md
    assert set(PAPER_TABLES) >= {"ldm_table8", "ldm_table2"}
    with pytest.raises(ValueError, match="ldm_table2.*ldm_table8"):
        compare_table("table99", {})


# ---------------------------------------------------------------------------------------- CLI


def _sweep_csv(path: Path) -> Path:
    for sampler, base in (("ddim", 60.0), ("dpmpp_2m", 50.0)):
        for steps in (10, 25, 50):
            fid = base / math.sqrt(steps)
            append_results_csv(path, flatten_results(_results(
                sampler={"name": sampler, "steps": steps, "cfg_scale": 3.0, "eta": 0.0},
                metrics={"fid": fid})))
    # a run whose FID failed: kept in the table, skipped in the summary and the plot
    append_results_csv(path, flatten_results(_results(metrics={"fid": None})))
    return path


def _md_rows(md: str, header_prefix: str) -> list[str]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_prefix))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def _check_png(path: Path) -> None:
    assert path.stat().st_size > 10_000
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 400 and im.height >= 300
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20  # lines, text


def test_cli_renders_markdown_and_plot(tmp_path, capsys):
    csv_path = _sweep_csv(tmp_path / "results.csv")
    out = tmp_path / "report"
    assert main([str(csv_path), "--x", "steps", "--y", "fid", "--group", "sampler,cfg_scale", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    md = (out / "results.md").read_text()
    summary = _md_rows(md, "| sampler | cfg_scale |")
    assert len(summary) == 2  # one row per group
    assert summary[0].startswith("| ddim | 3.0 | 18.97 | 12.00 | 8.49 |")  # 60/sqrt(steps), steps sorted
    assert "| sampler | cfg_scale | steps=10 | steps=25 | steps=50 |" in md
    assert len(_md_rows(md, "| sampler | cfg_scale | steps | fid |")) == 7  # one row per CSV row
    assert "vgg16 features" in md
    _check_png(out / "fid_vs_steps.png")


def test_cli_where_categorical_x_and_mixed_extractors(tmp_path):
    path = tmp_path / "results.csv"
    for f, rfid, ext in ((4, 1.0, "vgg16"), (8, 2.0, "vgg16"), (16, 3.0, "vgg16"), (8, 0.9, "inception")):
        append_results_csv(path, flatten_results(_results(
            task="recon", sampler=None, extractor={"name": ext}, metrics={"rfid": rfid}) | {"f": f}))
    append_results_csv(path, flatten_results(_results()))  # a generation row, filtered out below
    md_path, png = report(path, x="f", y="rfid", group=[], where=["task=recon"], out=tmp_path)
    md = md_path.read_text()
    summary = _md_rows(md, "| extractor | f=4 | f=8 | f=16 |")  # extractor added: never mixed on one line
    assert [r.split(" | ")[0] for r in summary] == ["| vgg16", "| inception"]
    assert "| vgg16 | 1.00 | 2.00 | 3.00 |" in md and "| inception | — | 0.90 | — |" in md
    _check_png(png)
    # a categorical x axis (checkpoint paths: not numbers) works too
    _, png2 = report(path, x="checkpoint", y="rfid", group=[], where=["task=recon", "extractor=vgg16"], out=tmp_path)
    _check_png(png2)


def test_bad_column_is_a_clear_error(tmp_path, capsys):
    csv_path = _sweep_csv(tmp_path / "results.csv")
    with pytest.raises(SystemExit) as e:
        main([str(csv_path), "--y", "fdi"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'fdi'" in err and "available columns" in err and "fid" in err and "steps" in err
    with pytest.raises(ValueError, match="available columns: checkpoint, config_hash"):
        report(csv_path, x="step")
    with pytest.raises(ValueError, match="--group"):
        report(csv_path, group=["solver"])
    with pytest.raises(ValueError, match="key=value"):
        report(csv_path, where=["sampler"])
    with pytest.raises(ValueError, match="no rows left"):
        report(csv_path, where=["sampler=euler"])
    assert not (tmp_path / "fdi_vs_steps.png").exists()


def test_python_dash_m_entry_point(tmp_path):
    csv_path = _sweep_csv(tmp_path / "results.csv")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ldm.report", str(csv_path), "--where", "sampler=ddim"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "results.md").is_file() and (tmp_path / "fid_vs_steps.png").is_file()
