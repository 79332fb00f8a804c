"""The faster training paths (issue "Performance") compute what the old ones did.

- EMA: one multi-tensor lerp equals a ``lerp_`` per parameter, bit for bit;
- classifier-free dropout of captions: choosing between caption and null tokens on the device (no host sync)
  gives the condition of the captions chosen on the host, bit for bit;
- optimizers: fused only where every parameter is on CUDA and the config chose no implementation; a resume keeps
  the implementation while it takes the new config's hyperparameters;
- logging: no per-step training metric goes through Lightning's progress-bar metrics (each would be copied to the
  host every step); the bar counts optimizer steps out of ``max_steps``.
"""

from __future__ import annotations

import copy
import functools
import types

import pytest
import torch
from helpers import TINY_RUN, compose_train
from torch import nn

import train
from ldm.lit.optim import build_optimizer, wants_fused
from ldm.lit.resilience import restart_optimisation
from ldm.models.ema import ema_update
from ldm.models.text_encoders import ClassEncoder, NullEncoder, TransformerTextEncoder
from ldm.pipeline import training_condition


def _per_parameter_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """The EMA update as it was: one lerp_ per parameter, buffers copied one by one."""
    with torch.no_grad():
        params = dict(ema.named_parameters())
        for name, p in model.named_parameters():
            params[name].lerp_(p, 1.0 - decay)
        buffers = dict(ema.named_buffers())
        for name, b in model.named_buffers():
            buffers[name].copy_(b)


def test_multi_tensor_ema_equals_the_per_parameter_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 5))
    ema = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3, 32, 32))  # BatchNorm statistics move: buffers must follow
        ema_update(ema, model, 0.9 + 0.03 * step)
        _per_parameter_ema(reference, model, 0.9 + 0.03 * step)
    for (name, a), b in zip(ema.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(ema[0].weight, model[0].weight)  # it averaged, it did not copy
    with pytest.raises(ValueError, match="differ in their parameters"):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.9)


@pytest.mark.parametrize("encoder", ["transformer", "none"])
def test_caption_dropout_on_the_device_equals_choosing_captions_on_the_host(encoder):
    torch.manual_seed(0)
    enc = TransformerTextEncoder(width=32, depth=2, heads=2, max_length=24) if encoder == "transformer" \
        else NullEncoder(16)
    enc.eval()
    captions = ["a red circle", "two blue squares on the left", "", "green triangle", "a small yellow star"]
    keep = torch.tensor([True, False, True, False, True])
    fast = training_condition(enc, {"caption": captions}, keep)
    context, mask = enc([c if k else n for c, k, n in zip(captions, keep.tolist(), enc.null_inputs(5),
                                                         strict=True)])
    assert torch.equal(fast["context"], context) and torch.equal(fast["context_mask"], mask)
    if encoder == "transformer":  # the dropped rows are the empty caption's, the kept ones are not
        null, _ = enc([""])
        assert torch.equal(fast["context"][1], null[0]) and not torch.equal(fast["context"][0], null[0])


def test_class_labels_still_drop_to_the_null_class():
    enc = ClassEncoder(num_classes=4, context_dim=8)
    cond = training_condition(enc, {"label": torch.tensor([0, 1, 2, 3])}, torch.tensor([True, False, True, False]))
    expected, _ = enc(torch.tensor([0, 4, 2, 4]))
    assert torch.equal(cond["context"], expected)


def test_optimizers_are_fused_only_on_cuda_and_only_when_the_config_chose_nothing():
    adamw = functools.partial(torch.optim.AdamW, betas=(0.9, 0.99))
    cpu = [nn.Parameter(torch.zeros(3))]
    assert not wants_fused(adamw, cpu)  # CPU parameters: the config's own implementation
    assert not build_optimizer(adamw, cpu, 1e-3).defaults["fused"]
    meta_cuda = [types.SimpleNamespace(is_cuda=True)]
    assert wants_fused(adamw, meta_cuda)
    assert not wants_fused(functools.partial(torch.optim.AdamW, foreach=True), meta_cuda)  # the user's choice
    assert not wants_fused(functools.partial(torch.optim.Adagrad), meta_cuda) or "fused" in \
        torch.optim.Adagrad.__init__.__code__.co_varnames  # only where torch has a fused kernel


@pytest.mark.gpu
def test_fused_adamw_on_cuda_matches_foreach():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(64, 64, device="cuda")) for _ in range(3)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    fused = build_optimizer(functools.partial(torch.optim.AdamW), params, 1e-2)
    plain = torch.optim.AdamW(twins, lr=1e-2, foreach=True)
    assert fused.defaults["fused"]
    for _ in range(3):
        for group in (params, twins):
            for p in group:
                p.grad = torch.ones_like(p) * 0.5
        fused.step()
        plain.step()
    for a, b in zip(params, twins, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_resume_keeps_the_optimizers_implementation_and_takes_the_new_hyperparameters():
    params = [nn.Parameter(torch.zeros(3))]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True, weight_decay=0.0)
    module = types.SimpleNamespace(trainer=types.SimpleNamespace(optimizers=[opt], lr_scheduler_configs=[],
                                                                 global_step=5))
    restart_optimisation(module, [functools.partial(torch.optim.AdamW, weight_decay=0.05)], 3e-4, None)
    group = opt.param_groups[0]
    assert group["lr"] == 3e-4 and group["weight_decay"] == 0.05 and group["foreach"] is True


def test_training_metrics_stay_off_the_progress_bar_and_the_bar_counts_steps(tmp_path, capsys):
    cfg = compose_train([*TINY_RUN, "trainer.max_steps=6", "trainer.enable_progress_bar=true",
                         "trainer.val_check_interval=3", "trainer.check_val_every_n_epoch=null",
                         "callbacks.throughput=null", "data.dataset.size=8"], output_dir=tmp_path)
    outcome = {}
    train.train(cfg, outcome)
    assert not [k for k in outcome["trainer"].progress_bar_metrics if k.startswith("train/")]
    out = capsys.readouterr()
    text = (out.out + out.err).replace("\r", "\n")
    assert "6/6" in text and "rec_loss=" in text and "Epoch 0/" not in text


@pytest.mark.parametrize("on_gpu", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["host", "gpu"])
def test_in_memory_latent_batches_are_gathered_whole_and_equal_per_sample_batches(stage1_ckpt, tmp_path, on_gpu):
    """``LatentMemoryDataset.__getitems__`` (and, on CUDA, batches gathered on the GPU) give the batches the
    per-sample path gave, in the same order, across epochs and after a mid-epoch resume of the loader."""
    from stage2_fixtures import shapes_data_module

    from ldm.cache import build_cache
    from ldm.data.latent_format import collate_latents
    from ldm.data.latents import LatentDataModule, LatentMemoryDataset
    from ldm.data.resumable import batch_len

    build_cache(stage1_ckpt, shapes_data_module(size=10, val_size=4, batch_size=2), tmp_path, device="cpu",
                progress=False, shard_size=4)
    data = LatentDataModule(tmp_path, batch_size=3, num_workers=0, in_memory=True, on_gpu=on_gpu, seed=5)
    loader = data.train_dataloader()
    assert loader.num_workers == 0 and not loader.pin_memory
    reference = LatentMemoryDataset(tmp_path, "train")
    order = [i for e in range(3) for i in loader.sampler._order(e)[:9]]  # 3 whole batches per epoch
    batches = []
    for _ in range(3):
        for batch in loader:
            loader.advance(batch_len(batch))  # what the training-state callback does after each step
            batches.append(batch)
    assert len(batches) == 9
    for n, batch in enumerate(batches):
        expected = collate_latents([reference[i] for i in order[3 * n:3 * n + 3]])
        assert batch.keys() == expected.keys()
        for key, value in expected.items():
            got = batch[key]
            if isinstance(value, torch.Tensor):
                assert got.device.type == ("cuda" if on_gpu else "cpu")
                assert got.dtype == value.dtype and torch.equal(got.cpu(), value), key
            else:
                assert got == value, key
    # resume mid-epoch: a fresh loader restored from the state after 4 batches continues with batch 5
    fresh = LatentDataModule(tmp_path, batch_size=3, num_workers=0, in_memory=True, on_gpu=on_gpu, seed=5)
    resumed = fresh.train_dataloader()
    resumed.load_state_dict({"epoch": 1, "consumed": 3, "batch_size": 3})
    first = next(iter(resumed))
    assert batch_len(first) == 3 and first["key"] == batches[4]["key"]
    assert torch.equal(first["mean"].cpu(), batches[4]["mean"].cpu())


@pytest.mark.gpu
def test_stage1_compiled_trains_like_eager_with_the_same_checkpoint_keys(tmp_path):
    """module.compile=true for stage 1 (encoder, decoder but its output conv, LPIPS, discriminator compiled; the
    adaptive GAN weight differentiates LPIPS and the discriminator once, the output conv alone): a run with the GAN active trains, its losses track the eager run's and its
    checkpoint has the eager run's keys."""
    from ldm.checkpoint import load_torch_file

    runs = {}
    for compiled in (False, True):
        cfg = compose_train([*[o for o in TINY_RUN if not o.startswith("trainer.accelerator")], "trainer=gpu",
                             "trainer.max_steps=6", "loss.disc_start=2", "trainer.val_check_interval=3",
                             "trainer.check_val_every_n_epoch=null", "callbacks.throughput=null",
                             "data.dataset.size=8", f"module.compile={str(compiled).lower()}"],
                            output_dir=tmp_path / str(compiled))
        runs[compiled] = train.train(cfg)
        assert torch.isfinite(torch.tensor(runs[compiled]["train/rec_loss"]))
    torch.testing.assert_close(torch.tensor(runs[True]["train/rec_loss"]), torch.tensor(runs[False]["train/rec_loss"]),
                               rtol=0.05, atol=0.02)
    keys = [load_torch_file(tmp_path / str(c) / "checkpoints" / "last.ckpt")["state_dict"].keys() for c in (False, True)]
    assert keys[0] == keys[1]


def _channels_last_runs(base: list[str], tmp_path, name: str) -> dict[bool, dict]:
    from ldm.checkpoint import load_torch_file

    runs = {}
    for cl in (False, True):
        metrics = train.train(compose_train([*base, f"module.channels_last={str(cl).lower()}"],
                                            output_dir=tmp_path / f"{name}{cl}"))
        state = load_torch_file(tmp_path / f"{name}{cl}" / "checkpoints" / "last.ckpt")["state_dict"]
        runs[cl] = {"metrics": metrics, "state": state}
    return runs


def test_channels_last_training_matches_the_default_layout(stage1_ckpt, tmp_path):
    """module.channels_last=true (NHWC weights and activations) for both stages trains like the default layout (other
    convolution kernels: other summation orders), and its checkpoints hold the same keys and values a default-layout
    module loads."""
    from test_train_stage2 import TINY_LDM

    stage1 = _channels_last_runs([*TINY_RUN, "trainer.max_steps=1", "loss.disc_start=0"], tmp_path, "s1_")
    stage2 = _channels_last_runs([*TINY_LDM, "trainer.max_steps=3", f"autoencoder.pretrained={stage1_ckpt}",
                                  f"cache_dir={tmp_path}/cache"], tmp_path, "s2_")
    for runs, loss, lr, steps in ((stage1, "train/rec_loss", 3e-3, 1), (stage2, "train/loss", 1e-4, 3)):
        torch.testing.assert_close(torch.tensor(runs[True]["metrics"][loss]),
                                   torch.tensor(runs[False]["metrics"][loss]), rtol=1e-3, atol=1e-4)
        assert runs[True]["state"].keys() == runs[False]["state"].keys()
        near = total = 0
        for key, value in runs[False]["state"].items():
            if not value.is_floating_point():
                continue
            # Adam's first updates are about +-lr per element whatever the gradient's size, so a gradient that is
            # rounding noise (a bias before a normalisation, an attention key bias: zero in exact arithmetic) moves
            # its weight by +-lr in either layout
            diff = (runs[True]["state"][key] - value).abs()
            assert diff.max() <= 2 * lr * steps + 1e-5, key
            if value.ndim >= 2:
                near, total = near + int((diff <= 1e-4 + 1e-3 * value.abs()).sum()), total + value.numel()
        assert near >= 0.98 * total, f"{loss}: {near} of {total} weights agree"
    conv = next(v for k, v in stage2[True]["state"].items() if v.ndim == 4 and v.shape[1] > 1 and v.shape[2] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # the layout did change


def test_module_compile_takes_false_true_or_a_torch_compile_mode():
    from ldm.runtime import compile_options

    assert compile_options(False) is None and compile_options(None) is None and compile_options(True) == {}
    assert compile_options("max-autotune-no-cudagraphs") == {"mode": "max-autotune-no-cudagraphs"}
    with pytest.raises(ValueError, match=r"module.compile='fast': use false, true or one of torch.compile's modes "
                                         r"\[.*'reduce-overhead'.*\]"):
        compile_options("fast")
    from ldm.config_checks import check_config

    with pytest.raises(ValueError, match=r"module.compile='fast'"):  # refused with the config, before any work
        check_config(compose_train([*TINY_RUN, "module.compile=fast"]))
