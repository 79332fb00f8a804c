"""The hand-written training loop of benchmarks/train_vs_loop.py: the stage-2 module's recipe step by step, and the
variants that change one thing each. Imported after train_vs_loop.py has put the measured tree's root on
``sys.path``."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.profiler import record_function
from tvl_measure import Window

import ldm.lit.ldm as ldm_module

try:  # the measured tree may be an older snapshot, whose guard lived in ldm.lit.resilience
    import ldm.lit.guard as guard_module
except ImportError:
    import ldm.lit.resilience as guard_module
from ldm.checkpoint import architecture
from ldm.data.latents import LatentMemoryDataset, read_manifest
from ldm.models.ema import ema_decay_at

# ------------------------------------------------------------------------------------ hand-written loop
# One switch per component; "recipe" = what train.py's module does. Each variant is recipe + the listed changes.
VARIANTS = {
    "recipe": {},
    "cudnn_benchmark": {"cudnn_benchmark": True},
    "fused_adamw": {"fused_adamw": True},
    "foreach_ema": {"foreach_ema": True},
    "no_guard_sync": {"guard_sync": False},          # clip without the isfinite(norm) host sync
    "no_keep_sync": {"keep_sync": False},            # CFG dropout on token ids on the GPU, no keep.tolist()
    "no_context_mask": {"mask": False},
    "no_ema": {"ema": False},
    "no_clip_no_guard": {"clip": False},
    "fixed_context": {"text": False},               # a fixed context of the same shape instead of the encoder
    "train_loader": {"data": "loader"},             # train.py's DataLoader instead of GPU-resident latents
    "all_fixes": {"cudnn_benchmark": True, "fused_adamw": True, "foreach_ema": True, "guard_sync": False,
                  "keep_sync": False},
    "bare": {"cudnn_benchmark": True, "fused_adamw": True, "ema": False, "clip": False, "text": False,
             "mask": False},  # ~ benchmarks/unet_train.py (context of the encoder's length, no mask)
    "bare77": {"cudnn_benchmark": True, "fused_adamw": True, "ema": False, "clip": False, "text": False,
               "mask": False, "ctx_len": 77},  # = benchmarks/unet_train.py: random context [B, 77, D]
}
DEFAULTS = {"cudnn_benchmark": False, "fused_adamw": False, "foreach_ema": False, "guard_sync": True,
            "keep_sync": True, "mask": True, "ema": True, "clip": True, "text": True, "data": "gpu",
            "ctx_len": None}


class Loop:
    """The module's training step, by hand. Models and data are built once; each variant gets a fresh optimizer,
    EMA copy and scheduler."""

    def __init__(self, cfg, device: torch.device, compiled: bool) -> None:
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            self.unet = instantiate(architecture(OmegaConf.to_container(cfg.unet, resolve=True)))
            self.text_encoder = instantiate(cfg.text_encoder)
        self.unet.train()
        self.text_encoder.train()
        # module.channels_last (--train-override module.channels_last=true): NHWC weights and U-Net inputs
        self.memory_format = torch.channels_last if cfg.module.get("channels_last") else torch.contiguous_format
        self.unet.to(memory_format=self.memory_format)
        self.ema = copy.deepcopy(self.unet).eval().requires_grad_(False)
        if compiled:
            mode = cfg.module.compile if isinstance(cfg.module.compile, str) else None
            self.unet.compile(**({"mode": mode} if mode else {}))  # as LatentDiffusionModule(compile=...): in place
        self.loss_fn = instantiate(cfg.loss).to(device)
        m = cfg.module
        self.lr, self.clip, self.p_uncond = float(m.base_learning_rate), m.gradient_clip_val, float(m.p_uncond)
        self.ema_decay, self.latent_norm, self.seed = m.ema_decay, str(m.latent_norm), int(m.seed)
        self.optimizer_factory = instantiate(m.optimizer)
        self.scheduler_factory = instantiate(m.lr_scheduler) if m.lr_scheduler is not None else None
        manifest = read_manifest(Path(cfg.cache_dir))
        self.stats = manifest["latent_stats"]
        ds = LatentMemoryDataset(cfg.cache_dir, "train")
        self.mean = ds.tensors["mean"].to(device).float()
        self.logvar = ds.tensors["logvar"].to(device).float()
        self.captions = ds.lists["caption"]
        self.n = len(self.captions)
        try:
            from ldm.stages import latents_on_gpu
        except ImportError:  # an older tree
            latents_on_gpu = getattr(__import__("train"), "latents_on_gpu", None)
        on_gpu = {"on_gpu": latents_on_gpu(cfg)} if latents_on_gpu is not None else {}
        self.data_module = instantiate(cfg.latent_data, path=str(cfg.cache_dir), **on_gpu)
        self.cuda = device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def params(self) -> list[torch.nn.Parameter]:
        return list(self.unet.parameters()) + list(self.text_encoder.parameters())  # configure_optimizers

    def run(self, window: Window, variant: dict) -> dict:
        v = {**DEFAULTS, **variant}
        torch.backends.cudnn.benchmark = v["cudnn_benchmark"]
        extra = {"fused": True} if v["fused_adamw"] and self.cuda else {}
        opt = self.optimizer_factory(self.params(), lr=self.lr, **extra)
        sched = self.scheduler_factory(opt) if self.scheduler_factory is not None else None
        ema = None
        if v["ema"] and self.ema_decay:
            ema = self.ema
            ema.load_state_dict(self.unet.state_dict())
        ema_pairs = ([p for p in ema.parameters()], [p for p in self.unet.parameters()]) if ema else None
        guard = guard_module.StepGuard(20)
        gen_data = torch.Generator().manual_seed(0)
        loader_iter = iter(self.data_module.train_dataloader()) if v["data"] == "loader" else None
        te = self.text_encoder
        fixed_ctx = None
        if not v["text"] and v["ctx_len"]:
            fixed_ctx = (torch.randn(window.batch, v["ctx_len"], te.context_dim, device=self.device), None)
        elif not v["text"]:
            with torch.no_grad():
                fixed_ctx = te(self.captions[: window.batch])
        null_ids = null_mask = None
        if not v["keep_sync"]:
            null_ids, null_mask, _ = te.tokenizer(te.null_inputs(1))
            null_ids, null_mask = null_ids.to(self.device), null_mask.to(self.device)
        B = window.batch

        def get_batch():
            if loader_iter is not None:
                batch = next(loader_iter)
                return {k: (x.to(self.device, non_blocking=True) if torch.is_tensor(x) else x)
                        for k, x in batch.items()}
            idx = torch.randint(0, self.n, (B,), generator=gen_data)
            idx_d = idx.to(self.device, non_blocking=True)
            return {"mean": self.mean[idx_d], "logvar": self.logvar[idx_d],
                    "caption": [self.captions[j] for j in idx.tolist()]}

        def condition(batch, keep):
            if fixed_ctx is not None:
                ctx, mask = fixed_ctx
                cond = {"context": ctx, "context_mask": mask}
            elif v["keep_sync"]:
                cond = ldm_module.training_condition(te, batch, keep)  # keep.tolist(): a host sync
            else:  # the same condition without a sync: choose caption or null tokens on the GPU
                ids, mask, _ = te.tokenizer(batch["caption"])
                ids, mask = ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
                k = keep[:, None]
                ids, mask = torch.where(k, ids, null_ids), torch.where(k, mask, null_mask)
                cond = {"context": te.encode(ids, mask), "context_mask": mask}
            if not v["mask"]:
                cond = {"context": cond["context"], "context_mask": None}
            return cond

        def loop_step(step: int) -> torch.Tensor:
            with record_function("loop.data"):
                batch = get_batch()
            gen = torch.Generator(device=self.device)  # as LatentDiffusionModule._generator
            gen.manual_seed(hash((self.seed, 0, step, 0)) % 2**63)
            with record_function("loop.training_step"), self.autocast:
                z = ldm_module.sample_posterior(batch["mean"], batch["logvar"], generator=gen)
                z = ldm_module.normalize_latents(z, self.stats, self.latent_norm)
                keep = torch.rand(z.shape[0], generator=gen, device=z.device) >= self.p_uncond
                cond = condition(batch, keep)
                fmt = self.memory_format
                loss, _ = self.loss_fn(lambda x, t: self.unet(x.contiguous(memory_format=fmt), t, **cond), z,
                                       generator=gen)
                loss = ldm_module.poison_if_not_finite(loss)
            with record_function("loop.zero_grad"):
                opt.zero_grad(set_to_none=True)
            with record_function("loop.backward"):
                loss.backward()
            with record_function("loop.clip_and_check"):
                if v["clip"] and v["guard_sync"]:
                    guard.check(opt, self.clip)
                elif v["clip"]:
                    torch.nn.utils.clip_grad_norm_([p for p in self.params() if p.grad is not None], float(self.clip),
                                                   foreach=True)
            opt.step()
            if sched is not None:
                sched.step()
            # a device bool when decided without a sync (older trees: guard.last_ok, a host bool)
            applied = guard.last_applied if hasattr(guard, "last_applied") else guard.last_ok
            if ema is not None and isinstance(applied, torch.Tensor):
                ldm_module.ema_update(ema, self.unet, ema_decay_at(step, self.ema_decay), applied=applied)
            elif ema is not None and applied:
                decay = ema_decay_at(step, self.ema_decay)
                if v["foreach_ema"]:
                    with record_function("ldm.ema_update"), torch.no_grad():
                        torch._foreach_lerp_(ema_pairs[0], ema_pairs[1], 1.0 - decay)
                else:
                    ldm_module.ema_update(ema, self.unet, decay)
            guard.end_step(step)
            return loss.detach()

        loss = None
        for i in range(window.total):
            window.before(i)
            loss = loop_step(i)
            window.after(i)
        result = dict(window.result)
        result["final_loss"] = round(float(loss), 4)
        return result
