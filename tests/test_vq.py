"""VQ-regularised first stage (issue: reproduce the paper): the quantiser's maths on hand-computed cases, the VQ
autoencoder's interface and key layout, the VQ loss, and a real VQ run through train.py, the cache, stage 2 and
sample.py at toy size; importing a CompVis VQ checkpoint (released key layout, random weights)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import TINY_RUN, compose_train, run_entry
from safetensors.torch import save_file

import train
from ldm.export import load_autoencoder, read_any
from ldm.models.vq import VectorQuantizer, VQModel, nearest_codes

CODES = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]])


def _quantizer(**kwargs) -> VectorQuantizer:
    q = VectorQuantizer(3, 2, **kwargs)
    with torch.no_grad():
        q.embedding.weight.copy_(CODES)
        if hasattr(q, "embed_sum"):
            q.embed_sum.copy_(CODES)
    return q


def _latents(rows: list[list[float]]) -> torch.Tensor:
    """[N, 2] rows as latents [1, 2, 1, N] (channels first), so row i is the encoding at pixel i."""
    return torch.tensor(rows).t().reshape(1, 2, 1, len(rows))


def test_nearest_codes_and_the_loss_on_a_hand_computed_case():
    z = _latents([[0.2, 0.1], [0.9, 1.3], [-0.6, 1.6]]).requires_grad_()
    assert nearest_codes(torch.tensor([[0.2, 0.1], [0.9, 1.3], [-0.6, 1.6]]), CODES).tolist() == [0, 1, 2]
    q = _quantizer(beta=0.25)
    out = q(z)
    # squared distances to the chosen codes: 0.05, 0.10, 0.32 over 6 elements
    mse = (0.05 + 0.10 + 0.32) / 6
    assert out.indices.tolist() == [[[0, 1, 2]]]
    assert math.isclose(out.commitment_loss.item(), mse, rel_tol=1e-6)
    assert math.isclose(out.codebook_loss.item(), mse, rel_tol=1e-6)
    assert math.isclose(out.loss.item(), mse + 0.25 * mse, rel_tol=1e-6)
    assert torch.allclose(out.z_q.detach(), CODES.t().reshape(1, 2, 1, 3), atol=1e-7)
    assert math.isclose(out.perplexity.item(), 3.0, rel_tol=1e-5) and out.usage.item() == 1.0
    out.loss.backward()
    # d/dz of 0.25 * mean((z - e)^2) = 0.25 * 2 (z - e) / 6; the codebook gets 2 (e - z) / 6 from its term
    assert torch.allclose(z.grad, 0.25 * 2 * (z.detach() - out.z_q.detach()) / 6, atol=1e-7)
    diff = CODES - torch.tensor([[0.2, 0.1], [0.9, 1.3], [-0.6, 1.6]])
    assert torch.allclose(q.embedding.weight.grad, 2 * diff / 6, atol=1e-7)


def test_legacy_puts_beta_on_the_codebook_term():
    z = _latents([[0.2, 0.1], [0.9, 1.3]]).requires_grad_()
    q = _quantizer(beta=0.25, legacy=True)
    out = q(z)
    out.loss.backward()
    mse = (0.05 + 0.10) / 4
    assert math.isclose(out.loss.item(), mse + 0.25 * mse, rel_tol=1e-6)
    assert torch.allclose(z.grad, 2 * (z.detach() - out.z_q.detach()) / 4, atol=1e-7)  # commitment weight 1
    assert torch.allclose(q.embedding.weight.grad[:2], 0.25 * 2 * (CODES[:2] - torch.tensor([[0.2, 0.1], [0.9, 1.3]]))
                          / 4, atol=1e-7)


def test_straight_through_passes_the_decoders_gradient_unchanged():
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    out = _quantizer()(z)
    upstream = torch.randn_like(z)
    (out.z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)


def test_ema_codebook_moves_codes_to_the_running_mean_of_their_encodings():
    rows = [[0.2, 0.1], [0.4, 0.3], [0.9, 1.3]]  # two encodings to code 0, one to code 1, none to code 2
    q = _quantizer(ema_decay=0.9).train()
    assert not q.embedding.weight.requires_grad
    with torch.enable_grad():
        out = q(_latents(rows).requires_grad_())
    assert out.codebook_loss.item() == 0.0
    size = torch.tensor([0.9 + 0.1 * 2, 0.9 + 0.1 * 1, 0.9])
    sums = torch.tensor([[0.6, 0.4], [0.9, 1.3], [0.0, 0.0]])
    embed_sum = 0.9 * CODES + 0.1 * sums
    assert torch.allclose(q.cluster_size, size) and torch.allclose(q.embed_sum, embed_sum)
    assert torch.allclose(q.embedding.weight, embed_sum / size[:, None])
    assert torch.equal(q.embedding.weight[2], CODES[2])  # an unused code keeps its vector
    before = q.embedding.weight.clone()
    with torch.no_grad():  # evaluation and no-grad passes never move the codebook
        q(_latents(rows))
    q.eval()
    with torch.enable_grad():
        q(_latents(rows).requires_grad_())
    assert torch.equal(q.embedding.weight, before)


def test_non_finite_latents_leave_the_codebook_alone():
    q = _quantizer(ema_decay=0.9, restart_threshold=0.5).train()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    with torch.enable_grad():
        q(_latents([[float("nan"), 0.0], [0.9, 1.3]]).requires_grad_())
    assert all(torch.equal(v, state[k]) for k, v in q.state_dict().items())


def test_dead_codes_restart_on_the_worst_represented_encodings():
    q = _quantizer(restart_threshold=0.95).train()  # counts start at 1 and decay by 0.99 a batch
    rows = [[0.1, 0.0], [0.0, 0.1], [0.6, 0.5], [1.0, 1.1]]  # code 2 is never chosen; [0.6, 0.5] is worst served
    with torch.enable_grad():
        for _ in range(5):
            q(_latents(rows).requires_grad_())
        assert torch.equal(q.embedding.weight[2], CODES[2])  # 0.99^5 > 0.95: still alive
        for _ in range(2):
            q(_latents(rows).requires_grad_())
    assert torch.equal(q.embedding.weight[2], torch.tensor([0.6, 0.5])) and q.cluster_size[2].item() == 1.0
    assert torch.equal(q.embedding.weight[:2], CODES[:2])


def test_vq_model_keeps_the_released_key_layout_and_quantises_on_decode():
    torch.manual_seed(0)
    model = VQModel(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=32, z_channels=4, embed_dim=3, n_embed=16)
    roots = {k.split(".")[0] for k in model.state_dict()}
    assert roots == {"encoder", "decoder", "quant_conv", "quantize", "post_quant_conv"}
    assert model.state_dict()["quantize.embedding.weight"].shape == (16, 3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = model.encode(x)
    assert posterior.mean.shape == (2, 3, 16, 16) and torch.equal(posterior.sample(), posterior.mode())
    assert posterior.kl().abs().max() == 0 and (posterior.logvar == -30).all()
    recon, quantized = model(x)
    assert torch.equal(model.decode(posterior.mode()), recon)  # decode quantises the pre-quantisation latent
    snapped = model.quantize.embedding.weight[quantized.indices].permute(0, 3, 1, 2)
    # z_q = z_e + sg[e - z_e] is e up to one rounding
    assert torch.allclose(model.decoder(model.post_quant_conv(snapped)), recon, atol=1e-5)
    with pytest.raises(ValueError, match="double_z=False"):
        VQModel(double_z=True)


def test_vq_loss_adds_the_weighted_quantiser_loss_to_the_mean_reconstruction():
    from ldm.losses.autoencoder import AutoencoderLoss, VQAutoencoderLoss
    from ldm.models.discriminator import NLayerDiscriminator

    torch.manual_seed(0)
    model = VQModel(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=32, z_channels=4, embed_dim=4, n_embed=16)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, quantized = model(x)
    loss = VQAutoencoderLoss(NLayerDiscriminator(ndf=8, n_layers=2), perceptual_weight=0.0, disc_start=10,
                             codebook_weight=0.5)
    total, logs = loss.generator_loss(x, recon, quantized, step=0)
    expected = (x - recon).abs().mean() + 0.5 * quantized.loss
    assert torch.allclose(total, expected) and loss.generator_parameters() == []
    assert {"quant_loss", "codebook_loss", "commitment_loss", "perplexity", "codebook_usage"} <= set(logs)
    with pytest.raises(TypeError, match="loss=autoencoder_vq"):
        AutoencoderLoss(NLayerDiscriminator(ndf=8, n_layers=2), perceptual_weight=0.0).generator_loss(
            x, recon, quantized, step=0)


def test_a_vq_autoencoder_with_the_kl_loss_is_refused_before_any_work(tmp_path):
    cfg = compose_train(TINY_RUN + ["autoencoder=tiny_vq"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="pass loss=autoencoder_vq"):
        train.check_config(cfg)
    cfg = compose_train(TINY_RUN + ["loss=autoencoder_vq", "loss.perceptual.net=alex"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="pass loss=autoencoder"):
        train.check_config(cfg)


def test_compvis_vq_checkpoint_imports_with_its_architecture(tmp_path):
    """A released-layout VQ file (first_stage_model.* with quantize.embedding.weight, plus loss.* and
    model_ema.* entries the import drops) reads as a VQModel with legacy=True, equal outputs."""
    torch.manual_seed(1)
    kwargs = dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[64], resolution=256, z_channels=3,
                  embed_dim=3, n_embed=32)
    ref = VQModel(**kwargs).eval()
    state = {f"first_stage_model.{k}": v for k, v in ref.state_dict().items()}
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    state["model_ema.decay"] = torch.tensor(0.999)
    save_file(state, str(tmp_path / "vq.safetensors"))
    spec = read_any(tmp_path / "vq.safetensors")["ldm"]["config"]["autoencoder"]
    assert spec == {"_target_": "ldm.models.vq.VQModel", **kwargs, "in_channels": 3, "out_ch": 3, "dropout": 0.0,
                    "beta": 0.25, "legacy": True, "double_z": False}
    model = load_autoencoder(tmp_path / "vq.safetensors")
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x)[0], ref(x)[0])


def test_vq_round_trip_through_train_cache_stage2_and_sample(tmp_path):
    """train.py with autoencoder=tiny_vq loss=autoencoder_vq writes a VQ checkpoint; stage 2 caches its
    pre-quantisation latents (point masses) and trains on them; sample.py decodes through the codebook."""
    run1 = tmp_path / "vq"
    cfg = compose_train(TINY_RUN + ["autoencoder=tiny_vq", "loss=autoencoder_vq", "loss.perceptual.net=alex",
                                    "loss.disc_start=2", "trainer.max_steps=3", "monitor=val/rec_loss"],
                        output_dir=run1)
    metrics = train.train(cfg)
    assert 0 < metrics["train/codebook_usage"] <= 1 and metrics["train/perplexity"] >= 1
    ckpt = run1 / "checkpoints" / "last.ckpt"
    model = load_autoencoder(ckpt)
    assert isinstance(model, VQModel) and read_any(ckpt)["ldm"]["latent_stats"]["scale"] > 0
    # exports: the released single-file layout reads back to the same model; diffusers has no place for it
    from ldm.export import export

    x = torch.rand(1, 3, 32, 32) * 2 - 1
    again = load_autoencoder(export(ckpt, "compvis", tmp_path / "vq.safetensors"))
    with torch.no_grad():
        assert torch.equal(again(x)[0], model(x)[0])
    with pytest.raises(ValueError, match="format=safetensors or format=compvis"):
        export(ckpt, "diffusers", tmp_path / "vq-diffusers")
    assert not (tmp_path / "vq-diffusers").exists()

    from test_train_stage2 import TINY_LDM

    run2 = tmp_path / "ldm"
    cfg2 = compose_train(TINY_LDM + [f"autoencoder.pretrained={ckpt}", f"cache_dir={run2}/cache",
                                     "trainer.max_steps=3"], output_dir=run2)
    train.train(cfg2)
    manifest = json.loads((run2 / "cache" / "manifest.json").read_text())
    assert manifest["autoencoder"]["config"]["_target_"] == "ldm.models.vq.VQModel"
    from ldm.data.latents import LatentMemoryDataset

    sample = next(iter(LatentMemoryDataset(run2 / "cache", "train")))
    assert (torch.as_tensor(sample["logvar"]) == -30).all()  # a point mass: stage 2 trains on z_e itself
    proc = run_entry("sample.py", f"ckpt={run2}/checkpoints/last.ckpt", "prompts=a red circle", "n=2", "steps=2",
                     f"out_dir={tmp_path}/samples", "device=cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "samples").rglob("*.png"))) >= 2


def test_pixel_space_is_the_identity_first_stage(tmp_path):
    """autoencoder.pretrained=identity: stage 2 diffuses pixels (f = 1, the paper's LDM-1); the cache holds the
    images themselves with statistics measured on them, and the checkpoint samples images of the data's size."""
    from test_train_stage2 import TINY_LDM

    from ldm.checkpoint import build_latent_diffusion
    from ldm.models.autoencoder import IdentityFirstStage

    stage = IdentityFirstStage()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert stage.downsample_factor == 1 and not stage.state_dict() and torch.equal(stage.decode(stage.encode(x).mode()), x)
    run = tmp_path / "ldm"
    cfg = compose_train(TINY_LDM + ["autoencoder.pretrained=identity", f"cache_dir={run}/cache", "resolution=16",
                                    "unet.in_channels=3", "unet.out_channels=3", "trainer.max_steps=2"], output_dir=run)
    train.check_config(cfg)
    train.train(cfg)
    manifest = json.loads((run / "cache" / "manifest.json").read_text())
    assert manifest["latent_shape"] == [3, 16, 16] and manifest["latent_stats"]["n_images"] > 0
    model = build_latent_diffusion(run / "checkpoints" / "last.ckpt")
    assert isinstance(model.autoencoder, IdentityFirstStage)
    from ldm.export import export

    with pytest.raises(ValueError, match="identity first stage"):
        export(run / "checkpoints" / "last.ckpt", "diffusers", tmp_path / "x")


def _vq_rank(rank: int, world: int, port: int, out: str, restart: float) -> None:
    """One rank of the DDP test: a shared seed builds the quantiser, each rank quantises its own batches."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        q = VectorQuantizer(16, 3, ema_decay=0.9, restart_threshold=restart).train()
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randn(2 * world, 3, 4, 4, generator=gen) * 2 for _ in range(4)]
        with torch.enable_grad():
            for batch in batches:  # each rank takes its slice of the global batch, as a distributed sampler does
                q(batch[rank * 2:(rank + 1) * 2].requires_grad_())
        torch.save({k: v.clone() for k, v in q.state_dict().items()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("restart", [0.0, 0.9], ids=["ema", "ema+restarts"])
def test_the_codebook_stays_identical_on_every_ddp_rank(tmp_path, restart):
    """Two gloo ranks quantising different halves of each batch: EMA counts and sums are all-reduced, so every rank
    ends with the same codebook and buffers, and without restarts they equal one process quantising whole batches;
    with restarts rank 0's candidates are broadcast before anything derives from them (the EMA sums included)."""
    import torch.multiprocessing as mp
    from helpers import free_port

    mp.spawn(_vq_rank, args=(2, free_port(), str(tmp_path), restart), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    torch.manual_seed(0)
    single = VectorQuantizer(16, 3, ema_decay=0.9, restart_threshold=restart).train()
    initial = single.embedding.weight.clone()
    gen = torch.Generator().manual_seed(1)
    with torch.enable_grad():
        for _ in range(4):
            single(torch.randn(4, 3, 4, 4, generator=gen).mul(2).requires_grad_())
    assert not torch.equal(ranks[0]["embedding.weight"], initial)  # the codebook did move
    if restart == 0.0:
        for key in ranks[0]:
            torch.testing.assert_close(ranks[0][key], single.state_dict()[key], msg=key)
    else:
        assert int((ranks[0]["cluster_size"] == 1.0).sum()) > 0  # some codes did restart
