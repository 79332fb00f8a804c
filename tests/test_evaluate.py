"""evaluate.py on tiny real checkpoints (CPU): stage-1 numbers against an independent computation, stage-2
generation with resume and cached reference statistics, FID/KID between image folders, the results files, and
the errors a researcher meets (no Inception weights, wrong checkpoint kind, missing image set)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONFIG_DIR, free_port
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

import evaluate
from ldm.checkpoint import build_autoencoder
from ldm.data.shapes import ShapesDataset
from ldm.data.shard_writer import write_shards
from ldm.losses.lpips import build_lpips
from ldm.metrics.features import build_extractor
from ldm.metrics.fid import FeatureStats, StatsAccumulator, fid_from_stats
from ldm.metrics.image_quality import psnr, ssim
from ldm.metrics.results import KEY_COLUMNS
from ldm.report import main as report_main

ROOT = Path(__file__).resolve().parents[1]
VAL = ["data=shapes", "data.dataset.val_size=16", "data.num_workers=0", "num_workers=0", "progress=false"]


def compose_eval(overrides: list[str], tmp: Path) -> object:
    """The composed `evaluate` config with Hydra's runtime set (as under @hydra.main); outputs under ``tmp``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("evaluate", return_hydra_config=True, overrides=[
            f"stats_dir={tmp}/stats", f"results_csv={tmp}/results.csv", *overrides])
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp / "run")
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="module")
def vgg32():
    """The pretrained vgg16 extractor at a 32 px input instead of 224 (49x less work on 2 CPU cores)."""
    extractor = build_extractor("vgg16")
    extractor.size, extractor.resize = 32, "bilinear-antialias 32x32"
    return extractor


@pytest.fixture
def fast_vgg(vgg32, monkeypatch):
    monkeypatch.setattr(evaluate, "build_extractor", lambda name, weights=None: vgg32)
    return vgg32


def _lpips_package(net: str, ours):
    """The `lpips` package's model with our trunk weights (as tests/test_lpips.py), an independent LPIPS."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    ref.net.load_state_dict({name: ours.state_dict()[f"features.{name.split('.')[1]}.{name.split('.')[2]}"]
                             for name, _ in ref.net.named_parameters()}, strict=True)
    return ref.eval()


def _stats(extractor, images: torch.Tensor) -> FeatureStats:
    acc = StatsAccumulator(extractor.dim)
    acc.update(extractor(((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)))
    return acc.result(extractor.identity(), {})


def test_stage1_numbers_equal_an_independent_computation(stage1_ckpt, fast_vgg, tmp_path):
    cfg = compose_eval([f"ckpt={stage1_ckpt}", "n_samples=12", "batch_size=5", "lpips_net=alex", *VAL,
                        f"out_dir={tmp_path}/out"], tmp_path)
    res = evaluate.evaluate(cfg)
    assert res["task"] == "recon" and res["n_images"] == 12 and res["weights"] == "raw"
    assert res["extractor"]["name"] == "vgg16" and res["data"]["resolution"] == 32

    # the same 12 val images, reconstructed with the posterior mode, measured by other code
    ds = ShapesDataset(split="val", size=16, val_size=16, resolution=32, seed=0)
    x = torch.stack([ds[i]["image"] for i in range(12)])
    model, _ = build_autoencoder(stage1_ckpt)
    with torch.no_grad():
        r = model.decode(model.encode(x).mode()).clamp(-1, 1)
        d = _lpips_package("alex", build_lpips("alex"))(x, r).flatten()
    m = res["metrics"]
    for name, values in (("psnr", psnr(x, r)), ("ssim", ssim(x, r)), ("lpips", d)):
        assert m[name]["mean"] == pytest.approx(values.double().mean().item(), rel=1e-4, abs=1e-5), name
        assert m[name]["std"] == pytest.approx(values.double().std(unbiased=False).item(), rel=1e-3, abs=1e-5)
    assert m["rfid"] == pytest.approx(fid_from_stats(_stats(fast_vgg, x), _stats(fast_vgg, r)), rel=1e-4)
    assert m["rfid"] > 0 and m["kid"]["mean"] != 0 and m["kid"]["std"] is None  # 12 images: one subset, no spread
    assert (tmp_path / "out" / "reconstructions.png").is_file()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["metrics"]["psnr"] == pytest.approx(m["psnr"]) and saved["config_hash"] == res["config_hash"]
    assert "vgg16" in (tmp_path / "out" / "results.md").read_text()
    with open(tmp_path / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["checkpoint"] == str(stage1_ckpt) and row["task"] == "recon" and row["seed"] == "0"
    assert float(row["psnr"]) == pytest.approx(m["psnr"]["mean"]) and row["extractor"] == "vgg16"
    assert (row["f"], row["z_channels"]) == ("4", "4") == (str(res["f"]), str(res["z_channels"]))  # the tiny KL-f4
    # the results CSV draws rFID against the downsampling factor (the paper's Table 8 axis)
    assert report_main([str(tmp_path / "results.csv"), "--x", "f", "--y", "rfid", "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "rfid_vs_f.png").is_file()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stage2_generates_resumes_and_caches_reference_stats(stage2_ckpt, fast_vgg, tmp_path):
    out = tmp_path / "gen"
    base = [f"ckpt={stage2_ckpt}", "n_samples=8", "batch_size=4", "sampler=ddim", "steps=2", "cfg_scale=2",
            "device=cpu", *VAL, f"out_dir={out}", "alignment=false"]
    first = evaluate.evaluate(compose_eval([*base, "alignment=auto"], tmp_path))  # auto: on for `shapes`
    assert first["task"] == "generation" and first["n_images"] == 8 and first["timing"]["generated_now"] == 8
    assert set(first["timing"]["phase_seconds"]) == {"checkpoint_sha256", "prompts", "reference_stats", "generation",
                                                    "generated_features", "alignment", "sample_grid"}
    assert first["sampler"] == {"name": "ddim", "steps": 2, "cfg_scale": 2.0, "eta": 0.0}
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(8)]
    with Image.open(out / "samples.png") as grid:  # 8 images of 32 px in one row, 2 px padding
        assert grid.size == (2 + 8 * 34, 2 + 34)
        cell = np.asarray(grid.convert("RGB"))[2:34, 2 + 34:2 + 34 + 32]
    with Image.open(out / "images" / "000001.png") as img:
        assert np.array_equal(cell, np.asarray(img.convert("RGB")))
    assert oct((out / "results.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in prompts] == [ShapesDataset("val", val_size=16, resolution=32)[i]["caption"]
                                              for i in range(8)]
    assert {"fid", "kid", "alignment", "alignment_color"} <= set(first["metrics"]) and "is" not in first["metrics"]
    stats_files = list((tmp_path / "stats").glob("*.npz"))
    assert len(stats_files) == 1 and FeatureStats.load(stats_files[0]).count == 8
    mtime = stats_files[0].stat().st_mtime_ns

    # same out_dir: nothing regenerated, reference stats reused, same numbers
    second = evaluate.evaluate(compose_eval(base, tmp_path))
    assert second["timing"]["generated_now"] == 0
    assert {k: second["metrics"][k] for k in ("fid", "kid")} == {k: first["metrics"][k] for k in ("fid", "kid")}
    assert stats_files[0].stat().st_mtime_ns == mtime

    # a deleted image is made again, identical (each chunk's noise is a function of seed and chunk)
    before = (out / "images" / "000005.png").read_bytes()
    (out / "images" / "000005.png").unlink()
    third = evaluate.evaluate(compose_eval(base, tmp_path))
    assert third["timing"]["generated_now"] == 4 and (out / "images" / "000005.png").read_bytes() == before

    # another reference count or resolution: new statistics, the first file untouched
    evaluate.evaluate(compose_eval(base + ["n_reference=6"], tmp_path))
    evaluate.evaluate(compose_eval(base + ["resolution=16"], tmp_path))
    counts = sorted((FeatureStats.load(p).count, FeatureStats.load(p).meta["resolution"])
                    for p in (tmp_path / "stats").glob("*.npz"))
    assert counts == [(6, 32), (8, 16), (8, 32)] and stats_files[0].stat().st_mtime_ns == mtime

    # other sampler settings into the same folder are refused
    with pytest.raises(ValueError, match="steps: 2 there, 3 now"):
        evaluate.evaluate(compose_eval([*base, "steps=3"], tmp_path))


def test_two_ranks_make_the_images_and_numbers_of_one(stage2_ckpt, tmp_path):
    """torchrun with 2 CPU ranks (gloo): chunk k by rank k % 2, reference and generated features computed by
    both ranks and gathered, results written by rank 0 alone; the same PNGs and FID as one process."""
    common = [f"ckpt={stage2_ckpt}", "n_samples=6", "batch_size=2", "sampler=ddim", "steps=2", "cfg_scale=2",
              "device=cpu", *VAL, "alignment=false", f"results_csv={tmp_path}/results.csv"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = {"one": [sys.executable, "evaluate.py"],
              "two": [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                      f"--master_port={free_port()}", "evaluate.py"]}
    for name, cmd in launch.items():
        proc = subprocess.run([*cmd, *common, f"out_dir={tmp_path}/{name}", f"stats_dir={tmp_path}/stats_{name}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
    for i in range(6):
        one, two = (tmp_path / run / "images" / f"{i:06d}.png" for run in ("one", "two"))
        assert one.read_bytes() == two.read_bytes(), f"image {i} differs between 1 and 2 ranks"
    res = {run: json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two")}
    assert res["two"]["n_images"] == res["two"]["n_reference"] == 6
    assert res["two"]["metrics"]["fid"] == pytest.approx(res["one"]["metrics"]["fid"], rel=1e-6)
    assert res["two"]["timing"]["generated_now"] == 6
    with open(tmp_path / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2  # one row per evaluation: rank 1 writes nothing


def _write_folder(path: Path, images: torch.Tensor) -> Path:
    path.mkdir(parents=True)
    for i, im in enumerate(((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(path / f"{i:03d}.png")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    val = ShapesDataset("val", val_size=10, resolution=32)
    g = torch.Generator().manual_seed(0)
    noise = torch.nn.functional.interpolate(torch.rand(10, 3, 4, 4, generator=g) * 2 - 1, size=32, mode="bicubic")
    return (_write_folder(root / "a", torch.stack([val[i]["image"] for i in range(10)])),
            _write_folder(root / "b", noise.clamp(-1, 1)))


def test_fid_between_folders_and_results_files(folders, fast_vgg, tmp_path, capsys):
    a, b = folders
    same = evaluate.evaluate(compose_eval(["task=fid", f"real={a}", f"fake={a}", "num_workers=0", "progress=false",
                                           f"out_dir={tmp_path}/same"], tmp_path))
    assert same["metrics"]["fid"] < 1e-6 and same["n_images"] == 10 and same["checkpoint"] is None
    other = evaluate.evaluate(compose_eval(["task=fid", f"real={a}", f"fake={b}", "num_workers=0", "progress=false",
                                            f"out_dir={tmp_path}/other"], tmp_path))
    assert other["metrics"]["fid"] > 1.0 and other["metrics"]["kid"]["mean"] > same["metrics"]["kid"]["mean"]
    printed = capsys.readouterr().out
    assert "| fid |" in printed and "| kid |" in printed
    for run, res in (("same", same), ("other", other)):
        data = json.loads((tmp_path / run / "results.json").read_text())
        assert data["metrics"]["fid"] == pytest.approx(res["metrics"]["fid"]) and data["extractor"]["name"] == "vgg16"
        assert data["timing"]["seconds_per_1000_images"] > 0 and (tmp_path / run / "results.md").is_file()
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == ["fid", "fid"] and list(rows[0])[:len(KEY_COLUMNS)] == list(KEY_COLUMNS)
    assert rows[0]["config_hash"] != rows[1]["config_hash"] and float(rows[1]["fid"]) > 1.0


def test_fid_takes_webdataset_shards_as_either_set(folders, fast_vgg, tmp_path):
    a, _ = folders
    images = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
              for p in sorted(a.glob("*.png"))]
    (tmp_path / "shards").mkdir()
    written = write_shards(({"image": im, "caption": "", "key": f"{i:03d}"} for i, im in enumerate(images)),
                           str(tmp_path / "shards" / "part-%03d.tar"), maxcount=6)
    assert len(written) == 2  # 6 + 4 images
    for real in (f"{tmp_path}/shards/part-{{000..001}}.tar", f"{tmp_path}/shards"):  # a brace pattern, a folder
        res = evaluate.evaluate(compose_eval(["task=fid", f"real='{real}'", f"fake={a}", "num_workers=0",
                                              "progress=false", f"out_dir={tmp_path}/out"], tmp_path))
        assert res["n_images"] == res["n_real"] == 10 and res["metrics"]["fid"] < 1e-6, real  # the same images


def test_fid_cli_prints_fid_and_kid_and_compares(folders, tmp_path):
    a, b = folders
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "task=fid", f"real={a}", f"fake={b}", f"out_dir={tmp_path}/out",
         f"results_csv={tmp_path}/results.csv", "compare=ldm_table2", "n_samples=4", "num_workers=0",
         "progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| fid |" in proc.stdout and "| kid |" in proc.stdout and "vgg16" in proc.stdout
    assert "LDM-KL-8" in proc.stdout and (tmp_path / "out" / "compare_ldm_table2.md").is_file()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["n_images"] == 4  # n_samples caps each set


def test_clear_errors(folders, stage1_ckpt, tmp_path, monkeypatch):
    a, _ = folders
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/torch/hub/checkpoints.*weights-inception"):
        evaluate.evaluate(compose_eval(["task=fid", f"real={a}", f"fake={a}", "extractor=inception"], tmp_path))
    with pytest.raises(ValueError, match="needs a stage-2 \\(ldm\\) checkpoint, but ckpt=.* is a 'autoencoder'"):
        evaluate.evaluate(compose_eval([f"ckpt={stage1_ckpt}", "task=generation"], tmp_path))
    with pytest.raises(FileNotFoundError, match="real=.*nope does not exist"):
        evaluate.evaluate(compose_eval(["task=fid", f"real={tmp_path}/nope", f"fake={a}"], tmp_path))
    with pytest.raises(ValueError, match="task=fid compares two image sets"):
        evaluate.evaluate(compose_eval(["task=fid", f"real={a}"], tmp_path))
    assert not os.path.exists(tmp_path / "results.csv")


def test_mean_std_matches_numpy():
    from ldm.metrics.image_quality import mean_std

    values = np.array([1.0, 2.0, 4.0])
    assert mean_std(values) == pytest.approx({"mean": values.mean(), "std": values.std()})
