"""What a hostile user found in the paper features (VQ, labels, recipes, pixel space, evaluation): each is now an
error that names the key and the fix, before any work."""

from __future__ import annotations

import json

import pytest
import torch
import webdataset as wds
from helpers import TINY_RUN, compose_train, run_entry
from test_class_labels import _png

import train
from ldm.data.shards import WebDatasetImages


def test_a_stage2_recipe_without_stage_ldm_and_a_bad_quantiser_value_are_one_line_errors():
    proc = run_entry("train.py", "experiment=paper/ldm4_cin256")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: experiment=paper/ldm4_cin256 is a stage-2 recipe: add "
                                                    "stage=ldm (and autoencoder.pretrained=<stage-1 checkpoint>)")
    proc = run_entry("train.py", "--cfg", "job", "autoencoder=tiny_vq", "loss=autoencoder_vq", "autoencoder.beta=-1")
    assert proc.returncode == 0  # composing alone is fine: the constructor refuses the value


@pytest.mark.parametrize("override,message", [("autoencoder.beta=-1", "beta and restart_threshold must be >= 0"),
                                              ("autoencoder.restart_threshold=-3", "must be >= 0"),
                                              ("loss.codebook_weight=-1", "codebook_weight must be >= 0")])
def test_nonsense_quantiser_values_are_refused_naming_the_section(override, message, tmp_path):
    cfg = compose_train(TINY_RUN + ["autoencoder=tiny_vq", "loss=autoencoder_vq", override], output_dir=tmp_path)
    with pytest.raises(Exception, match=message):
        train.build_autoencoder_stage(cfg, {})
    proc = run_entry("train.py", *TINY_RUN, "autoencoder=tiny_vq", "loss=autoencoder_vq", override,
                     f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()
    assert any(line.startswith(f"error: {override.split('.')[0]}: ") and message in line for line in last), last[-3:]


def test_negative_shard_labels_are_skipped_and_counted(tmp_path):
    with wds.TarWriter(str(tmp_path / "train-000000.tar")) as tar:
        tar.write({"__key__": "a", "png": _png(0), "cls": b"-5"})
        tar.write({"__key__": "b", "png": _png(1), "cls": b"2"})
    ds = WebDatasetImages(str(tmp_path / "train-000000.tar"), resolution=32, shuffle_buffer=0, epoch_size=None,
                          max_bad_fraction=1.0)
    samples = list(ds)
    assert [s["key"] for s in samples] == ["b"] and samples[0]["n_bad"] == 1
    assert any("negative" in why for why in ds.bad.bad_items.values())


def test_a_unet_that_does_not_fit_the_latents_is_named_before_the_cache(tmp_path):
    from test_train_stage2 import TINY_LDM

    cfg = compose_train(TINY_LDM + ["autoencoder.pretrained=identity", f"cache_dir={tmp_path}/cache", "resolution=16",
                                    "unet.in_channels=3"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="unet.in_channels=3 and unet.out_channels=4, but the autoencoder's latents "
                                         "have 3 channels: set unet.in_channels=3 unet.out_channels=3"):
        train.build_ldm_stage(cfg, {})
    assert not (tmp_path / "cache").exists()


def test_evaluate_refuses_to_measure_a_checkpoint_on_other_data_by_default(stage1_ckpt, tmp_path):
    from test_evaluate import VAL, compose_eval

    import evaluate
    from ldm.config_checks import check_eval_data

    ckpt = torch.load(stage1_ckpt, map_location="cpu", weights_only=True)
    ckpt["ldm"]["config"]["data"]["dataset"] = {"_target_": "ldm.data.images.ImageFolderDataset", "root": "/data/x"}
    torch.save(ckpt, tmp_path / "folder.ckpt")
    base = [f"ckpt={tmp_path}/folder.ckpt", "device=cpu", "lpips_net=null", "n_samples=4", "batch_size=4",
            "extractor=vgg16", f"out_dir={tmp_path}/eval"]
    with pytest.raises(ValueError, match=r"was trained on ldm.data.images.ImageFolderDataset \(root /data/x\), but "
                                         r"evaluate.py would measure it on ldm.data.shapes.ShapesDataset"):
        evaluate.evaluate(compose_eval(base + ["num_workers=0", "progress=false"], tmp_path))
    # named explicitly, the other data is what the user asked for
    cfg = compose_eval(base + VAL, tmp_path)
    check_eval_data(cfg, ckpt)
    assert json.loads(json.dumps(cfg.data.dataset._target_)) == "ldm.data.shapes.ShapesDataset"


def test_class_prompts_outside_the_models_classes_are_named():
    from ldm.models.text_encoders import ClassEncoder
    from ldm.pipeline import condition_inputs

    encoder = ClassEncoder(num_classes=3, context_dim=8)
    assert condition_inputs(encoder, [0, "2"], torch.device("cpu")).tolist() == [0, 2]
    for prompts in ([3], [-1, 0]):  # 3 is the null class: guidance's own, not a prompt
        with pytest.raises(ValueError, match=r"class prompts \[(3|-1)\] are outside this model's classes 0..2"):
            condition_inputs(encoder, prompts, torch.device("cpu"))
    with pytest.raises(ValueError, match="prompts must be class indices 0..2, got \\['a cat'\\]"):
        condition_inputs(encoder, ["a cat"], torch.device("cpu"))
