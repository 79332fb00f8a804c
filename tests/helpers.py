"""Compose the real Hydra configs in tests, the way train.py does."""

from __future__ import annotations

import socket
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def compose_train(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The composed `train` config with hydra's runtime values set, so every interpolation resolves."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
    else:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = "outputs/test"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


# Settings that make a stage-1 run small enough for 2 CPU cores.
TINY_RUN = [
    "resolution=32",
    "batch_size=4",
    "data.num_workers=0",
    "data.dataset.size=16",
    "loss.perceptual.net=alex",
    "loss.discriminator.ndf=8",
    "loss.discriminator.n_layers=2",
    "trainer.accelerator=cpu",
    "trainer.limit_val_batches=1",
    "trainer.val_check_interval=null",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "latent_stats_images=8",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for torchrun's rendezvous in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
