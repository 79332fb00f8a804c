"""Latent U-Net training and speed paths: gradient checkpointing, bf16 autocast (norms included), flash
attention on CUDA, channels_last, torch.compile, and the benchmark script; each exact or close to fp32."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from helpers import accumulation_length, assert_float32_close
from unet_fixtures import ROOT, inputs, n_params, preset, randomize, small_unet

from ldm.models.blocks import GroupNorm32, LayerNorm

# ------------------------------------------------------------------------------------- training / speed paths


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = randomize(small_unet(dropout=0.0)).train()
    ckpt = small_unet(use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = inputs(plain)
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        model(x, t, ctx).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    n = 2 * accumulation_length(plain)  # forward and backward
    for key in grads[0]:
        assert_float32_close(grads[1][key], grads[0][key], n, key)


def test_norms_run_in_half_precision_under_autocast_and_are_exact_otherwise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 8, 8, generator=gen) * 3 + 1
    gn, ref_gn = GroupNorm32(32, 64, eps=1e-6), torch.nn.GroupNorm(32, 64, eps=1e-6)
    ln, ref_ln = LayerNorm(64), torch.nn.LayerNorm(64)
    with torch.no_grad():
        for a, b in ((gn, ref_gn), (ln, ref_ln)):
            a.weight.normal_(1, 0.2, generator=gen), a.bias.normal_(0, 0.2, generator=gen)
            b.load_state_dict(a.state_dict())
        tokens = x.flatten(2).transpose(1, 2)
        assert torch.equal(gn(x), ref_gn(x)) and torch.equal(ln(tokens), ref_ln(tokens))  # fp32: identical
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_gn, y_ln = gn(x.bfloat16()), ln(tokens.bfloat16())
            assert gn(x).dtype == torch.float32  # fp32 input stays on the exact path
        assert y_gn.dtype == y_ln.dtype == torch.bfloat16  # no fp32 copy of the activation map
        torch.testing.assert_close(y_gn.float(), ref_gn(x.bfloat16().float()), atol=3e-2, rtol=1e-2)
        torch.testing.assert_close(y_ln.float(), ref_ln(tokens.bfloat16().float()), atol=3e-2, rtol=1e-2)


def test_bf16_autocast_forward_and_backward_stay_close_to_fp32():
    model = randomize(small_unet()).train()
    x, t, ctx = inputs(model)
    ref = model(x, t, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, ctx)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.gpu
def test_cuda_bf16_step_keeps_norms_in_bf16_and_runs_flash_attention():
    """On the GPU the strided q/k/v views must be accepted by the flash kernel (no fallback, no copies) and no
    norm may hand an fp32 map to the next layer under bf16 autocast."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = randomize(small_unet()).cuda().train()
    x, t, ctx = (v.cuda() for v in inputs(model, size=16))
    dtypes = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
        for m in model.modules()
        if isinstance(m, (GroupNorm32, LayerNorm))
    ]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t, ctx)
    out.float().square().mean().backward()
    for hook in hooks:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    with torch.no_grad():
        ref = model(x, t, ctx)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_channels_last_gives_the_same_output():
    model = randomize(small_unet()).eval()
    x, t, ctx = inputs(model)
    with torch.no_grad():
        ref = model(x, t, ctx)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t, ctx)
    assert_float32_close(out, ref, accumulation_length(model))  # other conv kernels: other summation orders


def test_compiles_as_one_graph_with_checkpointing_and_autocast():
    """Dynamo captures the whole U-Net (fullgraph: no graph breaks) in the training configuration."""
    torch._dynamo.reset()
    model = preset("tiny", use_checkpoint=True).train()
    x, t, ctx = inputs(model, tokens=5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x, t, ctx, mask)
        ref = model(x, t, ctx, mask)
    out.float().sum().backward()
    torch.testing.assert_close(out, ref)
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_tiny_unet_matches_eager():
    """The real compiler (inductor) on the tiny preset; ~1 min on 2 CPU cores with a cold cache."""
    torch._dynamo.reset()
    model = randomize(preset("tiny")).eval()
    x, t, ctx = inputs(model)
    try:
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            out = compiled(x, t, ctx)
    except Exception as err:  # no C++ toolchain etc.
        pytest.skip(f"torch.compile unsupported here: {err}")
    with torch.no_grad():
        assert_float32_close(out, model(x, t, ctx), accumulation_length(model))  # fused kernels: other orders
    torch._dynamo.reset()


def test_benchmark_script_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("unet_train", ROOT / "benchmarks" / "unet_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    report = bench.main(
        [
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--batch",
            "1",
            "--size",
            "8",
            "--context-len",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--modes",
            "eager",
            "--precision",
            "fp32",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == report
    for kind in ("ours", "diffusers"):
        res = report["results"][kind]["eager"]
        assert res["img_per_s"] > 0 and res["params"] == n_params(preset("tiny"))
    assert report["speedup_ours_vs_diffusers"]["eager"] > 0
