"""Small real stage-1 checkpoints and data for stage-2 tests, without a Lightning training run.

``make_stage1_checkpoint`` builds the tiny AutoencoderKL from the composed train config (TINY_RUN settings),
optionally fits it for a few Adam steps on L1 reconstruction of `shapes` images (``steps``; about 1-3 s per
step on 2 CPU cores, so off by default: the cache and stage-2 plumbing do not need good latents), computes its latent statistics with ``latent_statistics`` and saves a dict shaped like the
Lightning checkpoint train.py writes: {"state_dict": {"autoencoder.<k>": ...}, "ldm": {"stage", "config",
"latent_stats"}, "pytorch-lightning_version", "global_step", "epoch"}.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from helpers import TINY_RUN, compose_train, resolved
from hydra.utils import instantiate

from ldm.checkpoint import architecture, atomic_torch_save, build_autoencoder, load_checkpoint
from ldm.data.datamodules import ImageDataModule
from ldm.data.latent_format import autoencoder_identity
from ldm.data.shapes import ShapesDataset
from ldm.models.latent_stats import latent_statistics


def shapes_batch(n: int, resolution: int = 32, split: str = "train", seed: int = 0) -> torch.Tensor:
    """The first ``n`` `shapes` images of ``split`` as [n, 3, resolution, resolution] in [-1, 1]."""
    ds = ShapesDataset(split=split, size=max(n, 1), val_size=max(n, 1), resolution=resolution, seed=seed)
    return torch.stack([ds[i]["image"] for i in range(n)])


def shapes_data_module(resolution: int = 32, size: int = 20, val_size: int = 8, batch_size: int = 8,
                       seed: int = 0) -> ImageDataModule:
    """An ImageDataModule over `shapes` built as Hydra builds configs/data/shapes.yaml (a partial factory)."""
    factory = functools.partial(ShapesDataset, size=size, val_size=val_size, resolution=resolution, seed=seed)
    return ImageDataModule(factory, batch_size=batch_size, num_workers=0, seed=seed)


def make_stage1_checkpoint(path: str | Path, resolution: int = 32, seed: int = 0, steps: int = 0,
                           stage: str = "autoencoder", with_stats: bool = True, lr: float = 2e-3) -> Path:
    """Write a stage-1 checkpoint of the tiny autoencoder to ``path`` and return the path.

    ``seed`` changes the initial weights (so two seeds give two different autoencoders); ``steps``: Adam steps
    on L1 reconstruction of 8 `shapes` images, which also give the latent statistics; ``stage`` and
    ``with_stats`` make deliberately wrong checkpoints.
    """
    path = Path(path)
    cfg = compose_train(TINY_RUN + [f"resolution={resolution}", f"seed={seed}"], output_dir=path.parent)
    config = resolved(cfg)
    torch.manual_seed(seed)
    model = instantiate(cfg.autoencoder)
    images = shapes_batch(8, resolution)
    if steps:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            recon, _ = model(images, generator=gen)
            loss = (recon - images).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    stats = None
    if with_stats:
        stats = latent_statistics(model.encode, [images], len(images), generator=torch.Generator().manual_seed(seed))
    ckpt = {
        "state_dict": {f"autoencoder.{k}": v.detach().clone() for k, v in model.state_dict().items()},
        "ldm": {"stage": stage, "config": config, "latent_stats": stats},
        "pytorch-lightning_version": "2.5.0",
        "global_step": steps,
        "epoch": 0,
    }
    atomic_torch_save(ckpt, path)
    return path


def make_stage2_checkpoint(path: str | Path, stage1_ckpt: str | Path, ema_offset: float = 0.0,
                           overrides: list[str] | None = None) -> Path:
    """A stage-2 checkpoint shaped like the one train.py writes: tiny U-Net + text transformer at random init,
    the stage-1 autoencoder and its statistics (plumbing tests need no trained U-Net). ``ema_offset`` is added
    to the EMA copy of the U-Net, so that tests can tell the EMA weights from the raw ones; ``overrides`` replace
    the small text transformer's settings (e.g. another text encoder) and change others."""
    path = Path(path)
    text = ["text_encoder.width=32", "text_encoder.depth=1", "text_encoder.heads=2"] if overrides is None else []
    cfg = compose_train(["stage=ldm", "resolution=32", *text, f"autoencoder.pretrained={stage1_ckpt}", *(overrides or [])],
                        output_dir=path.parent)
    s1 = load_checkpoint(stage1_ckpt)
    torch.manual_seed(0)
    unet, text = instantiate(architecture(resolved(cfg)["unet"])), instantiate(cfg.text_encoder)
    state = {f"{prefix}.{k}": v.clone() for prefix, m in (("unet", unet), ("text_encoder", text))
             for k, v in m.state_dict().items()}
    state.update({f"unet_ema.{k}": v + ema_offset if v.is_floating_point() else v.clone()
                  for k, v in unet.state_dict().items()})
    state.update(s1["state_dict"])
    ae, stats = build_autoencoder(s1)
    meta = {"stage": "ldm", "config": resolved(cfg), "latent_stats": stats, "latent_norm": "scale",
            "latent_shape": [4, 8, 8], "text_encoder": text.identity(),
            "autoencoder": {"ckpt_path": str(stage1_ckpt), "identity": autoencoder_identity(ae),
                            "config": s1["ldm"]["config"]["autoencoder"]}}
    atomic_torch_save({"state_dict": state, "ldm": meta, "global_step": 0, "epoch": 0}, path)
    return path
