"""Every config composes, presets build, and bad configs fail before any work with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CONFIG_DIR, compose_train, resolved
from hydra.errors import ConfigCompositionException

import train

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["stage", "autoencoder", "loss", "data", "trainer", "logger", "callbacks", "experiment", "debug",
          "hparams_search"]


def _options(group: str) -> list[str]:
    base = Path(CONFIG_DIR) / group
    return sorted(str(p.relative_to(base).with_suffix("")) for p in base.rglob("*.yaml"))


# groups (and experiments) that belong to stage 2; everything else is composed with the default stage 1
LDM_GROUPS = ["unet", "text_encoder", "sampler"]
LDM_EXPERIMENTS = {"quickstart/ldm", "paper/ldm_kl8_txt2img", "paper/ldm4_cin256", "paper/ldm8_cin256",
                   "paper/ldm4_celebahq", "paper/ldm4_lsun"}


def _stage_of(group: str, option: str) -> str:
    return "ldm" if group in LDM_GROUPS or (group == "experiment" and option in LDM_EXPERIMENTS) else "autoencoder"


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in GROUPS + LDM_GROUPS for o in _options(g)],
    ids=lambda s: s.replace("/", "-"),
)
def test_every_config_composes_and_resolves(group, option, tmp_path):
    stage = _stage_of(group, option)
    key = "sampler@sampling" if group == "sampler" else group
    overrides = [f"{key}={option}"] + ([f"stage={stage}"] if group != "stage" else [])
    if group == "stage":
        stage = option
    cfg = compose_train(overrides, output_dir=tmp_path)
    out = resolved(cfg)
    assert out["stage_name"] == stage
    assert out["trainer"]["_target_"] == "pytorch_lightning.Trainer"
    if stage == "ldm":  # the U-Net's cross-attention width follows the condition encoder
        assert out["unet"]["context_dim"] == out["text_encoder"]["context_dim"]


def test_default_ldm_run_is_the_stage2_quickstart(tmp_path):
    cfg = resolved(compose_train(["stage=ldm"], output_dir=tmp_path))
    assert cfg["module"]["_target_"] == "ldm.lit.ldm.LatentDiffusionModule"
    assert cfg["loss"]["schedule"] == "linear" and cfg["loss"]["num_timesteps"] == 1000
    assert cfg["monitor"] == "val/loss" and cfg["resolution"] == 32
    assert cfg["autoencoder"] == {"pretrained": "???"} and cfg["unet"]["pretrained"] is None  # the first required
    assert "autoencoder_ckpt" not in cfg and "unet_pretrained" not in cfg


def test_sample_config_composes(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for sampler in _options("sampler"):
            cfg = compose("sample", overrides=[f"sampler={sampler}", "ckpt=x.ckpt", "prompts=a red circle"])
            assert cfg.sampler.name == sampler and cfg.sampler.steps > 0 and cfg.prompts == "a red circle"
        # a single prompt with commas (every `shapes` caption has one) is one prompt, not a Hydra sweep
        import sample

        plain = "a large red circle in the center, on a black background"
        with pytest.raises(ConfigCompositionException, match="Ambiguous value"):  # what Hydra alone does
            compose("sample", overrides=["ckpt=x.ckpt", f"prompts={plain}"])
        for prompt in [plain, "Bob's circle, \\o/", "a, b\\", "x, \\'y'", "x=y", "a circle (red)", "it's #1!", "a; b & c"]:
            args = sample.quote_prompt_overrides(["ckpt=x.ckpt", f"prompts={prompt}", "prompts=[a,b]", "n=2"])
            assert args[0] == "ckpt=x.ckpt" and args[2:] == ["prompts=[a,b]", "n=2"]
            assert compose("sample", overrides=args[:2]).prompts == prompt


def test_missing_stage1_checkpoint_is_named(tmp_path):
    cfg = compose_train(["stage=ldm"], output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"stage=ldm needs the stage-1 checkpoint: autoencoder.pretrained="):
        train.check_config(cfg)
    for key in ("autoencoder.pretrained", "unet.pretrained"):
        cfg = compose_train(["stage=ldm", f"autoencoder.pretrained={tmp_path}/nope.ckpt",
                             f"unet.pretrained={tmp_path}/nope.ckpt"], output_dir=tmp_path)
        with pytest.raises(ValueError, match=f"{key}=.*nope.ckpt does not exist"):
            train.check_config(cfg)


def test_pretrained_sources_compose_and_pass_the_checks(tmp_path):
    """`autoencoder.pretrained=` / `unet.pretrained=` compose, pass the checks and the U-Net spec still builds."""
    from ldm.checkpoint import architecture, instantiate

    (tmp_path / "ae.ckpt").touch()
    (tmp_path / "unet").mkdir()
    cfg = compose_train(["stage=ldm", f"autoencoder.pretrained={tmp_path}/ae.ckpt", f"unet.pretrained={tmp_path}/unet"],
                        output_dir=tmp_path)
    train.check_config(cfg)
    out = resolved(cfg)
    assert out["autoencoder"]["pretrained"] == f"{tmp_path}/ae.ckpt" and out["unet"]["pretrained"] == f"{tmp_path}/unet"
    assert instantiate(architecture(out["unet"])).context_dim == out["text_encoder"]["context_dim"]


@pytest.mark.parametrize("command,old,new", [("train.py", "autoencoder_ckpt", "autoencoder.pretrained"),
                                             ("train.py", "unet_pretrained", "unet.pretrained"),
                                             ("-m ldm.cache", "ckpt", "autoencoder.pretrained")])
def test_removed_key_spellings_name_the_new_key(command, old, new, tmp_path):
    """One way to say each thing: the older spellings are refused before any work, naming the key to use."""
    from helpers import run_entry

    proc = run_entry(*command.split(), "stage=ldm" if command == "train.py" else "out_dir=x", f"{old}={tmp_path}/a.ckpt")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {old}= is no longer a key of python {command}: "
                                                    f"pass {new}={tmp_path}/a.ckpt")
    assert "Traceback" not in proc.stderr


def test_a_config_stored_with_the_older_spellings_resumes_under_the_new_keys():
    """A checkpoint written before the rename stored `autoencoder_ckpt` (with `autoencoder.pretrained: ???`): a
    resume with the same sources under the new keys is not a change; another autoencoder is still refused."""
    from ldm.runs import config_changes

    old = {"autoencoder": {"pretrained": "???"}, "autoencoder_ckpt": "a.ckpt", "unet": {"pretrained": None},
           "unet_pretrained": "u", "trainer": {"max_steps": 10}}
    new = {"autoencoder": {"pretrained": "a.ckpt"}, "unet": {"pretrained": "u"}, "trainer": {"max_steps": 20}}
    assert config_changes(old, new) == ({}, {"trainer.max_steps": [10, 20]})
    refused, _ = config_changes(old, {**new, "autoencoder": {"pretrained": "b.ckpt"}})
    assert refused == {"autoencoder.pretrained": ["a.ckpt", "b.ckpt"]}
    # keys added since read as the behaviour the older run had: only a real change is reported
    stored = {"stage_name": "ldm", "module": {"lr": 1}}
    now = {"stage_name": "ldm", "module": {"lr": 1, "channels_last": False}, "ddp_find_unused_parameters": False}
    assert config_changes(stored, now) == ({}, {"ddp_find_unused_parameters": [True, False]})


def test_cache_config_names_its_autoencoder(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ldm.cache import run

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("cache", overrides=["autoencoder.pretrained=x.ckpt", "out_dir=y"])
        assert cfg.autoencoder.pretrained == "x.ckpt" and "ckpt" not in cfg
        with pytest.raises(ValueError, match="no autoencoder: pass autoencoder.pretrained="):
            run(compose("cache", overrides=["out_dir=y"]))
        with pytest.raises(FileNotFoundError, match="autoencoder.pretrained=x.ckpt does not exist"):
            run(cfg)


def test_default_run_is_the_cpu_quickstart(tmp_path):
    cfg = resolved(compose_train([], output_dir=tmp_path))
    assert cfg["autoencoder"]["ch_mult"] == [1, 2, 2]
    assert cfg["data"]["dataset"]["_target_"] == "ldm.data.shapes.ShapesDataset"
    assert cfg["trainer"]["precision"] == "auto"  # bf16-mixed on a GPU, 32-true on the CPU (train.auto_precision)
    assert cfg["trainer"]["max_steps"] > 0


def test_auto_precision_on_this_machine():
    import torch

    expected = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if torch.cuda.is_available() \
        else "32-true"
    assert train.auto_precision() == expected
    assert train.auto_precision("cpu") == "32-true"  # never autocast on the CPU unless asked


def test_paper_recipes_validate_by_steps(tmp_path):
    cfg = resolved(compose_train(["experiment=paper/kl_f8"], output_dir=tmp_path))
    # an epoch of `shapes` at batch 12 is shorter than 5,000 steps: validation must count steps, not epochs
    assert cfg["trainer"]["val_check_interval"] == 5000 and cfg["trainer"]["check_val_every_n_epoch"] is None


def test_resolution_not_divisible_is_rejected(tmp_path):
    cfg = compose_train(["autoencoder=kl_f8", "resolution=100"], output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"resolution=100 is not divisible .* factor 8.*resolution=96"):
        train.check_config(cfg)


def test_gpu_trainer_without_cuda_is_rejected(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = compose_train(["trainer=gpu"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="CUDA is not available"):
        train.check_config(cfg)


def test_unknown_key_and_option_are_named(tmp_path):
    with pytest.raises(ConfigCompositionException, match="batch_sz"):
        compose_train(["batch_sz=3"])
    with pytest.raises(ConfigCompositionException, match="kl_f9"):
        compose_train(["autoencoder=kl_f9"])


def test_cli_fails_fast_with_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "resolution=30", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "resolution=30 is not divisible" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("data", _options("data"))
def test_evaluate_config_composes(data, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for sampler in _options("sampler"):
            cfg = compose("evaluate", overrides=[f"data={data}", f"sampler={sampler}", "ckpt=x.ckpt", "resolution=32"],
                          return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = str(tmp_path)
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            out = OmegaConf.to_container(cfg, resolve=True)
            assert out["task"] == "auto" and out["extractor"] == "auto" and out["sampler"]["name"] == sampler
            assert out["data"]["dataset"]["resolution"] == 32 and out["stats_dir"] and out["results_csv"]


def test_export_config_composes_and_names_bad_keys():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("export", overrides=["ckpt=x.ckpt", "out=y", "format=diffusers"])
        assert (cfg.format, cfg.weights, cfg.dtype) == ("diffusers", "ema", None)
        with pytest.raises(ConfigCompositionException, match="weight"):
            compose("export", overrides=["ckpt=x.ckpt", "out=y", "weight=raw"])


@pytest.mark.parametrize("option", _options("text_encoder"))
def test_every_text_encoder_option_fits_its_class_in_a_stage2_run(option, tmp_path):
    """Composed into the default stage-2 run (whose experiment sets other values), every key of the text encoder
    config is an argument of its class: no option breaks on a key that belongs to another encoder."""
    import importlib
    import inspect

    out = resolved(compose_train(["stage=ldm", f"text_encoder={option}"], output_dir=tmp_path))
    spec = out["text_encoder"]
    if spec is None:
        return
    module, _, name = spec["_target_"].rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    unknown = sorted(k for k in spec if not k.startswith("_") and k not in params)
    assert not unknown, f"text_encoder={option}: {unknown} are not arguments of {spec['_target_']}"


def test_ddp_looks_for_unused_parameters_only_in_stage_1(tmp_path):
    """Stage 1's generator and discriminator backwards each leave part of the model out, so DDP must search for
    unused parameters; stage 2 trains every parameter each step and skips that extra pass over the graph."""
    for stage, expected in ((["stage=autoencoder"], True), (["stage=ldm"], False)):
        cfg = resolved(compose_train([*stage, "trainer=ddp"], output_dir=tmp_path))
        assert cfg["trainer"]["strategy"]["find_unused_parameters"] is expected, stage
    override = ["stage=ldm", "trainer=ddp", "ddp_find_unused_parameters=true"]  # a U-Net with a skipped branch
    assert resolved(compose_train(override, output_dir=tmp_path))["trainer"]["strategy"]["find_unused_parameters"]
