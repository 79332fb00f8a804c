"""Fault tests (DESIGN.md, rules for long runs, 1): nothing in a checkpoint runs code, whichever entry point reads it.

Crafted files: (a) a pickle whose ``__reduce__`` opens a marker file; (b) real tiny stage-1 / stage-2 checkpoints
whose stored config names a code-running ``_target_`` (``torch.fx.graph_module._exec_with_source``, which ``exec``s
its ``src``: on code that builds any ``torch.`` target it creates the marker) in place of the autoencoder, U-Net,
text encoder or diffusion loss; (c) that config in our exports (``x.safetensors`` + ``x.json``, a diffusers folder's
``ldm.json``, a CompVis-style file's metadata). Every entry point (sample.py, evaluate.py, ``python -m ldm.cache``,
``train.py stage=ldm autoencoder.pretrained= / unet.pretrained=``, ``python -m ldm.export``) and the Python API must
refuse it with a message that names the key and the file, and the marker must not exist afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {  # where a crafted stage-2 checkpoint puts the payload: the key path in the message, the dict path
    "unet": ("config.unet", ("config", "unet")),
    "text_encoder": ("config.text_encoder", ("config", "text_encoder")),
    "loss": ("config.loss", ("config", "loss")),
    "frozen_autoencoder": ("autoencoder.config", ("autoencoder", "config")),
}


def payload(marker: Path) -> dict:
    """A ``_target_`` spec that, if built, creates ``marker`` (``_exec_with_source(src, globals)`` execs ``src``)."""
    return {"_target_": "torch.fx.graph_module._exec_with_source", "src": f"open({str(marker)!r}, 'w').close()",
            "globals": {}}


class _OpensMarker:
    """Unpickling this (without weights_only) creates the marker file: ``open(marker, "w")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _set(meta: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        meta = meta[k]
    meta[path[-1]] = value


def crafted(src: Path, dst: Path, path: tuple[str, ...], value) -> Path:
    """A copy of the checkpoint ``src`` whose ``ckpt["ldm"]`` has ``value`` at ``path``. (Plain ``torch.load`` /
    ``torch.save`` here, not ldm's readers: the crafting must also work on code from before them.)"""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    _set(ckpt["ldm"], path, value)
    torch.save(ckpt, dst)
    return dst


def pickle_bomb(dst: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "ldm": {"stage": "autoencoder"},
                "payload": _OpensMarker(marker)}, dst)
    return dst


def assert_refused(message: str, key: str, file: Path | str, marker: Path, what: str = "") -> None:
    """The refusal names the key and the file (on one line of the message), and nothing ran."""
    assert not marker.exists(), f"{what}: the payload ran ({marker} exists)"
    lines = [line for line in message.splitlines() if "refusing to build" in line]
    assert lines, f"{what}: no refusal in: {message[-2000:]}"
    assert any(f"key {key}" in line and str(file) in line for line in lines), f"{what}: {lines}"


def assert_pickle_refused(message: str, file: Path, marker: Path, what: str = "") -> None:
    assert not marker.exists(), f"{what}: the payload ran ({marker} exists)"
    lines = [line for line in message.splitlines() if "never runs code from a checkpoint" in line]
    assert any(str(file) in line for line in lines), f"{what}: {message[-2000:]}"


# ------------------------------------------------------------------------------------------------ files

@pytest.fixture(scope="module")
def files(stage1_ckpt, stage2_ckpt, tmp_path_factory) -> dict:
    """Every crafted file of this module, each with its own marker (so a leak names the entry point)."""
    from ldm.export import export

    d = tmp_path_factory.mktemp("crafted")
    out: dict = {"dir": d}
    m = lambda name: d / f"marker-{name}"  # noqa: E731
    for name in ("autoencoder", "loss"):  # the stage-1 loss is never built from a checkpoint, but is checked too
        out[f"s1_{name}"] = crafted(stage1_ckpt, d / f"s1_{name}.ckpt", ("config", name), payload(m(f"s1_{name}")))
    for name, (_, path) in SECTIONS.items():
        out[f"s2_{name}"] = crafted(stage2_ckpt, d / f"s2_{name}.ckpt", path, payload(m(f"s2_{name}")))
    out["pickle"] = pickle_bomb(d / "pickle.ckpt", m("pickle"))

    pair = export(stage2_ckpt, "safetensors", d / "pair.safetensors")  # a good export, then its config crafted
    meta = json.loads(pair.with_suffix(".json").read_text())
    meta["config"]["unet"] = payload(m("pair"))
    pair.with_suffix(".json").write_text(json.dumps(meta))
    out["pair"] = pair
    folder = export(stage2_ckpt, "diffusers", d / "pipeline")
    meta = json.loads((folder / "ldm.json").read_text())
    meta["config"]["text_encoder"] = payload(m("pipeline"))
    (folder / "ldm.json").write_text(json.dumps(meta))
    out["pipeline"] = folder
    single = export(stage2_ckpt, "compvis", d / "single.ckpt")
    ckpt = torch.load(single, map_location="cpu", weights_only=True)
    ckpt["ldm_export"]["config"]["loss"] = payload(m("single"))
    torch.save(ckpt, single)
    out["single"] = single
    out["marker"] = m
    return out


# ------------------------------------------------------------------------------------------- Python API

def _api_calls(source: Path, training_checkpoint: bool = True):
    """Every public reader of the Python API, on ``source`` (and ``ldm.checkpoint``'s readers of our ``.ckpt``)."""
    import ldm.checkpoint as ckpt_module
    from ldm.export import load_autoencoder, load_latent_diffusion, load_unet, read_any

    calls = {"load_latent_diffusion": lambda: load_latent_diffusion(source),
             "load_autoencoder": lambda: load_autoencoder(source), "load_unet": lambda: load_unet(source),
             "read_any": lambda: read_any(source)}
    if training_checkpoint:
        calls.update(build_latent_diffusion=lambda: ckpt_module.build_latent_diffusion(source),
                     build_autoencoder=lambda: ckpt_module.build_autoencoder(source),
                     build_unet=lambda: ckpt_module.build_unet(source),
                     load_checkpoint=lambda: ckpt_module.load_checkpoint(source))
    return calls


@pytest.mark.parametrize("name,key,where", [
    ("s1_autoencoder", "config.autoencoder._target_", None),
    ("s1_loss", "config.loss._target_", None),
    *[(f"s2_{n}", f"{key}._target_", None) for n, (key, _) in SECTIONS.items()],
    ("pair", "config.unet._target_", "pair.json"),
    ("pipeline", "config.text_encoder._target_", "pipeline/ldm.json"),
    ("single", "config.loss._target_", None),
])
def test_python_api_refuses_a_stored_code_target(files, name, key, where):
    source, marker = files[name], files["marker"](name)
    file = files["dir"] / where if where else source
    for call, fn in _api_calls(source, training_checkpoint=name.startswith(("s1_", "s2_"))).items():
        with pytest.raises(ValueError) as err:
            fn()
        assert_refused(str(err.value), key, file, marker, call)


def test_python_api_refuses_a_pickle_payload(files):
    source, marker = files["pickle"], files["marker"]("pickle")
    for call, fn in _api_calls(source).items():
        with pytest.raises(ValueError) as err:
            fn()
        assert_pickle_refused(str(err.value), source, marker, call)


@pytest.mark.parametrize("spec_of", [
    lambda m, unet: {**unet, "_partial_": True},
    lambda m, unet: {**unet, "_args_": [payload(m)]},
    lambda m, unet: {**unet, "_recursive_": False},
    lambda m, unet: {**unet, "_convert_": "all"},
    lambda m, unet: {**unet, "dropout": payload(m)},  # nested in an argument
    lambda m, unet: {**unet, "channel_mult": [1, {"value": payload(m)}]},  # deeper, in a list
], ids=["partial", "args", "recursive", "convert", "nested", "nested_in_list"])
def test_hydra_tricks_are_refused(stage2_ckpt, tmp_path, spec_of):
    from ldm.export import load_latent_diffusion

    marker = tmp_path / "marker"
    unet = torch.load(stage2_ckpt, map_location="cpu", weights_only=True)["ldm"]["config"]["unet"]
    evil = crafted(stage2_ckpt, tmp_path / "evil.ckpt", ("config", "unet"), spec_of(marker, unet))
    with pytest.raises(ValueError, match=r"refusing to build .*\(key config\.unet[.\[]") as err:
        load_latent_diffusion(evil)
    assert str(evil) in str(err.value) and not marker.exists()


@pytest.mark.parametrize("fmt,out", [("safetensors", "x.safetensors"), ("diffusers", "x"), ("compvis", "x.ckpt")])
@pytest.mark.parametrize("name", ["s1_autoencoder", "s1_loss", *[f"s2_{n}" for n in SECTIONS]])
def test_export_refuses_and_writes_nothing(files, tmp_path, name, fmt, out):
    from ldm.export import export

    with pytest.raises(ValueError) as err:
        export(files[name], fmt, tmp_path / out)
    key = f"config.{name[3:]}" if name.startswith("s1_") else SECTIONS[name.removeprefix("s2_")][0]
    assert_refused(str(err.value), f"{key}._target_", files[name], files["marker"](name))
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "export wrote files for a refused config"


# ------------------------------------------------------------------------------------------ entry points

def _entry_points(files: dict, stage1_ckpt: Path, tmp: Path) -> dict[str, tuple[list[str], str, str, Path]]:
    """name -> (command, marker name, key refused, file named) for every command line that reads a checkpoint."""
    py = sys.executable
    ev = ["device=cpu", "num_workers=0", "progress=false", f"stats_dir={tmp}/stats", f"results_csv={tmp}/r.csv"]
    tiny_ldm = ["stage=ldm", "resolution=32", "data.num_workers=0", "data.dataset.size=8", "data.dataset.val_size=4",
                "latent_data.num_workers=0", "latent_stats_images=8", "trainer.accelerator=cpu"]
    s1, s2u, s2t = files["s1_autoencoder"], files["s2_unet"], files["s2_text_encoder"]
    return {
        "sample": ([py, "sample.py", f"ckpt={s2u}", "prompts=a", f"out_dir={tmp}/sample"],
                   "s2_unet", "config.unet._target_", s2u),
        "sample_pair": ([py, "sample.py", f"ckpt={files['pair']}", "prompts=a", f"out_dir={tmp}/sample_pair"],
                        "pair", "config.unet._target_", files["pair"].with_suffix(".json")),
        "sample_pipeline": ([py, "sample.py", f"ckpt={files['pipeline']}", "prompts=a", f"out_dir={tmp}/sample_pl"],
                            "pipeline", "config.text_encoder._target_", files["pipeline"] / "ldm.json"),
        "evaluate_recon": ([py, "evaluate.py", f"ckpt={s1}", "task=recon", f"out_dir={tmp}/ev1", *ev],
                           "s1_autoencoder", "config.autoencoder._target_", s1),
        "evaluate_generation": ([py, "evaluate.py", f"ckpt={s2t}", "task=generation", f"out_dir={tmp}/ev2", *ev],
                                "s2_text_encoder", "config.text_encoder._target_", s2t),
        "cache": ([py, "-m", "ldm.cache", f"autoencoder.pretrained={s1}", f"out_dir={tmp}/cache", "device=cpu",
                   f"hydra.run.dir={tmp}/cache_run"], "s1_autoencoder", "config.autoencoder._target_", s1),
        "train_autoencoder_pretrained": ([py, "train.py", *tiny_ldm, f"autoencoder.pretrained={s1}",
                                          f"cache_dir={tmp}/train_cache1", f"hydra.run.dir={tmp}/train1"],
                                         "s1_autoencoder", "config.autoencoder._target_", s1),
        "train_unet_pretrained": ([py, "train.py", *tiny_ldm, f"autoencoder.pretrained={stage1_ckpt}",
                                   f"unet.pretrained={s2u}", f"cache_dir={tmp}/train_cache2",
                                   f"hydra.run.dir={tmp}/train2"], "s2_unet", "config.unet._target_", s2u),
        "export": ([py, "-m", "ldm.export", f"ckpt={s2u}", "format=diffusers", f"out={tmp}/export_out",
                    f"hydra.run.dir={tmp}/export_run"], "s2_unet", "config.unet._target_", s2u),
        "sample_pickle": ([py, "sample.py", f"ckpt={files['pickle']}", "prompts=a", f"out_dir={tmp}/sample_pk"],
                          "pickle", "", files["pickle"]),
    }


@pytest.fixture(scope="module")
def cli_runs(files, stage1_ckpt, tmp_path_factory) -> dict:
    """Every entry point run once on its crafted file, two at a time (each is mostly Python start-up)."""
    tmp = tmp_path_factory.mktemp("cli")
    points = _entry_points(files, stage1_ckpt, tmp)
    env = dict(os.environ, HF_HUB_OFFLINE="1", LDM_OFFLINE="1", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")

    def run(cmd):
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        proc.seconds = round(time.perf_counter() - started, 1)
        return proc

    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(points, pool.map(run, [p[0] for p in points.values()]), strict=True))
    return {"tmp": tmp, **{name: (procs[name], *points[name][1:]) for name in points}}


@pytest.mark.parametrize("name", ["sample", "sample_pair", "sample_pipeline", "evaluate_recon", "evaluate_generation",
                                  "cache", "train_autoencoder_pretrained", "train_unet_pretrained", "export",
                                  "sample_pickle"])
def test_entry_point_refuses(cli_runs, files, name):
    proc, marker_name, key, file = cli_runs[name]
    marker = files["marker"](marker_name)
    assert proc.returncode != 0, f"{name} accepted a crafted checkpoint ({proc.seconds} s):\n{proc.stderr[-3000:]}"
    if key:
        assert_refused(proc.stderr, key, file, marker, name)
    else:
        assert_pickle_refused(proc.stderr, file, marker, name)
    if name == "export":  # nothing written, not even a temporary folder
        assert not [p.name for p in cli_runs["tmp"].iterdir() if "export_out" in p.name]


# -------------------------------------------------------------------------------------------- registry

def _targets(node) -> list[str]:
    if isinstance(node, dict):
        found = [node["_target_"]] if "_target_" in node else []
        return found + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


MODEL_PRESETS = sorted(p for group in ("autoencoder", "unet", "text_encoder", "loss")
                       for p in (ROOT / "configs" / group).glob("*.yaml"))


@pytest.mark.parametrize("path", MODEL_PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_model_preset_target_is_registered(path):
    """What a stored model config can name comes from these presets: each of their targets must build from a
    checkpoint (presets keep working), except the stage-1 loss's parts, which are never built from a checkpoint."""
    from ldm.checkpoint import RECORDED_ONLY, REGISTRY, check_spec
    from ldm.export import preset_spec

    raw = yaml.safe_load(path.read_text())
    for target in _targets(raw):
        if path.parent.name == "loss" and not path.stem.startswith("diffusion"):
            assert target in REGISTRY or target in RECORDED_ONLY, f"{path}: {target} is neither built nor recorded"
        else:
            assert target in REGISTRY, f"{path}: {target} is not in ldm.checkpoint.REGISTRY"
    if path.parent.name != "loss" and "_target_" in raw:  # as a preset (interpolations resolved) it passes too
        check_spec(preset_spec(path.parent.name, path.stem), origin=str(path))


def test_registry_is_ldm_classes_and_exact_torch_names():
    import importlib

    from ldm.checkpoint import MOVED_TARGETS, RECORDED_ONLY, REGISTRY, TORCH_TARGETS

    outside = sorted(k for k in REGISTRY if not k.startswith("ldm."))
    assert set(outside) <= set(TORCH_TARGETS), f"registered outside ldm: {outside}"
    torch_in_configs = {t for p in (ROOT / "configs").rglob("*.yaml") for t in _targets(yaml.safe_load(p.read_text()))
                        if t.startswith("torch.")}
    assert set(TORCH_TARGETS) <= torch_in_configs, "a torch target no shipped config names"
    assert not set(TORCH_TARGETS) & {"torch.optim.Adam", "torch.optim.AdamW"}, "optimizers are never rebuilt"
    for target, obj in REGISTRY.items():  # every name is what it says; a moved one builds what its new name does
        if target in MOVED_TARGETS:
            assert obj is REGISTRY[MOVED_TARGETS[target]], target
            continue
        module, _, attr = target.rpartition(".")
        assert getattr(importlib.import_module(module), attr) is obj, target
    assert not RECORDED_ONLY & REGISTRY.keys(), "the stage-1 loss parts are never built from a checkpoint"


def test_real_checkpoints_pass_the_check(stage1_ckpt, stage2_ckpt):
    from ldm.checkpoint import check_stored_config

    for path in (stage1_ckpt, stage2_ckpt):
        check_stored_config(torch.load(path, map_location="cpu", weights_only=True)["ldm"], str(path))
