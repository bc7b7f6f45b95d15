"""Per-method checks against independent references written from docs/METHODS.md."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dreampeft as dp
from dreampeft.adapters import FourierFTLayer, MoRALayer
from dreampeft.adapters.fourierft import FFT_GRAD_AREA, SPARSE_COST
from dreampeft.adapters.mora import FOLD_TOKENS, mora_rank

from .cases import build, example_input


def _layer(cls, d_out, d_in, cfg, seed=0):
    torch.manual_seed(seed)
    return cls(nn.Linear(d_in, d_out), cfg)


# ---------------------------------------------------------------- FourierFT
def test_fourierft_seed_2024_entries():
    """Reference values on torch 2.13 CPU for a 768x768 layer (issue 3)."""
    layer = _layer(FourierFTLayer, 768, 768, dp.FourierFTConfig(n_frequency=1000))
    rows, cols = layer.indices
    assert (rows * 768 + cols)[:5].tolist() == [466568, 254852, 455206, 248204, 53127]
    other = _layer(FourierFTLayer, 768, 768, dp.FourierFTConfig(n_frequency=1000), seed=5)
    assert torch.equal(other.indices, layer.indices)  # shared by every layer of the shape
    assert not torch.equal(_layer(FourierFTLayer, 768, 768, dp.FourierFTConfig(seed=1)).indices,
                           layer.indices)


@pytest.mark.parametrize("d_out,d_in", [(7, 9), (9, 7), (8, 8), (6, 10)])
def test_fourierft_closed_form(d_out, d_in):
    layer = _layer(FourierFTLayer, d_out, d_in, dp.FourierFTConfig(n_frequency=20, scaling=3.0))
    c, (rows, cols) = layer.spectrum.detach().double(), layer.indices.double()
    p = torch.arange(d_out, dtype=torch.float64)[:, None, None]
    q = torch.arange(d_in, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (p * rows / d_out + q * cols / d_in)
    expected = 3.0 / (d_out * d_in) * (c * torch.cos(phase)).sum(-1)
    torch.testing.assert_close(layer.delta_weight().double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("d_out,d_in", [(33, 47), (64, 64), (40, 90)])
def test_fourierft_gradient_matches_autograd_through_ifft2(d_out, d_in):
    layer = _layer(FourierFTLayer, d_out, d_in, dp.FourierFTConfig(n_frequency=300, scaling=150.0))
    g = torch.randn(d_in, d_out).T  # non-contiguous, as weight gradients arrive on CUDA
    layer.delta_weight().backward(g)
    spec = layer.spectrum.detach().clone().requires_grad_()
    dense = torch.zeros(d_out, d_in, dtype=torch.complex64)
    dense = dense.index_put((layer.indices[0], layer.indices[1]), spec.to(torch.complex64))
    (torch.fft.ifft2(dense).real * 150.0 * g).sum().backward()
    torch.testing.assert_close(layer.spectrum.grad, spec.grad, rtol=1e-4, atol=1e-6)


# (d_out, d_in, n, tokens) over odd/even sides, by the path they take: ΔW never formed (few tokens),
# fused W0 + ΔW with the spectrum gradient from activation rffts, fused with the dense gradient
FOURIER_PATHS = {"sparse": [(33, 47, 3, 30), (64, 64, 8, 30), (7, 8, 1, 6), (90, 40, 7, 60)],
                 "fused, rfft gradient": [(64, 64, 8, 600), (40, 90, 7, 600), (90, 40, 7, 600)],
                 "fused, dense gradient": [(33, 47, 300, 30), (64, 64, 300, 30)]}


def _fourier_path(d_out, d_in, n, tokens):
    if tokens * n * SPARSE_COST < d_out * d_in:
        return "sparse"
    return "fused, rfft gradient" if d_out * d_in >= FFT_GRAD_AREA * n else "fused, dense gradient"


assert all(_fourier_path(*case) == path for path, cases in FOURIER_PATHS.items() for case in cases)


@pytest.mark.parametrize("d_out,d_in,n,tokens", [c for cases in FOURIER_PATHS.values() for c in cases])
@pytest.mark.parametrize("autocast", [False, True])
def test_fourierft_training_path_equals_autograd_through_the_dense_update(d_out, d_in, n, tokens, autocast):
    """Every training path: values and gradients must equal base(x) + scale·x ΔWᵀ differentiated
    by autograd, for odd and even sides (the Nyquist bins), leading batch dims, a bias and a scale."""
    layer = _layer(FourierFTLayer, d_out, d_in, dp.FourierFTConfig(n_frequency=n, scaling=150.0))
    layer.set_scale(0.5)
    x, g = torch.randn(2, tokens // 2, d_in), torch.randn(2, tokens // 2, d_out)
    results = []
    reference = lambda v: layer.base_layer(v) + layer.scale * (v @ layer.delta_weight().T)  # noqa: E731
    for path, amp in ((layer, autocast), (reference, False)):  # the reference in float32
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = path(xi)
        assert y.dtype == (torch.bfloat16 if amp else torch.float32)
        y.backward(g.to(y.dtype))
        results.append((y.detach().float(), xi.grad, layer.spectrum.grad.clone()))
        layer.spectrum.grad = None
    for got, want in zip(*results):
        if autocast:  # bfloat16 matmuls: within a few of its ulps of the largest value
            assert (got - want).abs().max() <= 2e-2 * want.abs().max()
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_fourierft_matches_peft():
    peft = pytest.importorskip("peft")
    ours, theirs = build("unet"), build("unet")
    # scaling 10: at 150 a 64x64 layer's ΔW is ~6x W0 and the random UNet amplifies float noise
    dp.inject_adapters(ours, dp.FourierFTConfig(n_frequency=300, scaling=10.0, seed=7))
    theirs = peft.inject_adapter_in_model(peft.FourierFTConfig(
        n_frequency=300, scaling=10.0, random_loc_seed=7, target_modules=list(dp.UNET_ATTENTION)), theirs)
    for name, layer in dp.adapter_layers(ours).items():
        other = theirs.get_submodule(name)
        assert torch.equal(other.indices["default"].long(), layer.indices), name
        other.fourierft_spectrum["default"].copy_(layer.spectrum)
        torch.testing.assert_close(layer.delta_weight(), other.get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-6)
    inputs = example_input("unet")
    torch.testing.assert_close(ours(**inputs).sample, theirs(**inputs).sample, rtol=1e-4, atol=1e-5)


def test_fourierft_inference_cache_follows_the_spectrum():
    layer = _layer(FourierFTLayer, 20, 30, dp.FourierFTConfig(n_frequency=50))
    x = torch.randn(4, 30)
    with torch.no_grad():
        a = layer(x)
        layer.spectrum.mul_(2.0)
        b = layer(x)
        layer.set_scale(0.5)
        c = layer(x)
    delta = a - layer.base_layer(x)
    torch.testing.assert_close(b - layer.base_layer(x), 2 * delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c - layer.base_layer(x), delta, rtol=1e-4, atol=1e-5)


def test_fourierft_rejects_more_frequencies_than_entries():
    with pytest.raises(dp.ConfigError, match="n_frequency=50 exceeds the 4x10 layer's 40 entries"):
        _layer(FourierFTLayer, 4, 10, dp.FourierFTConfig(n_frequency=50))


# ---------------------------------------------------------------- MoRA
def naive_mora(x: torch.Tensor, M: torch.Tensor, d_out: int, t: int) -> torch.Tensor:
    """docs/METHODS.md §4 for one input vector, loop by loop."""
    r, d_in = M.shape[0], x.numel()
    n_in = -(-d_in // r)
    xp = torch.cat([x, x[: n_in * r - d_in]])
    if t in (1, 4):
        c = torch.stack([xp[i::r].sum() for i in range(r)])
    elif t in (2, 3):
        sizes = [d_in // r + (1 if i < d_in % r else 0) for i in range(r)]
        starts = [sum(sizes[:i]) for i in range(r)]
        c = torch.stack([x[s:s + n].sum() for s, n in zip(starts, sizes)])
    if t == 6:
        theta = torch.tensor([10000 ** (-2 * j / r) for j in range(r // 2)], dtype=torch.float64)
        outs = []
        for b in range(n_in):
            v = xp[b * r:(b + 1) * r].double()
            ang = b * torch.cat([theta, theta])
            a = v * ang.cos() + torch.cat([-v[r // 2:], v[: r // 2]]) * ang.sin()
            outs.append(M.double() @ a)
        z = torch.cat(outs)
        return torch.cat([z] * (d_out // z.numel() + 1))[:d_out].float()
    z = M @ c
    if t in (1, 3):
        return torch.stack([z[i % r] for i in range(d_out)])
    reps = [d_out // r + (1 if i < d_out % r else 0) for i in range(r)]
    return torch.cat([z[i].repeat(n) for i, n in enumerate(reps)])


MORA_TYPES = [1, 2, 3, 4, 6]
SMALL = [(37, 53), (53, 37), (40, 40), (12, 90)]  # (d_out, d_in): odd, tall, wide, square


@pytest.mark.parametrize("t", MORA_TYPES)
@pytest.mark.parametrize("d_out,d_in", SMALL)
def test_mora_matches_naive_reference(t, d_out, d_in):
    layer = _layer(MoRALayer, d_out, d_in, dp.MoRAConfig(r=2, mora_type=t))
    with torch.no_grad():
        layer.M.copy_(torch.randn_like(layer.M))
    x = torch.randn(3, d_in)
    expected = torch.stack([naive_mora(v, layer.M.detach(), d_out, t) for v in x])
    torch.testing.assert_close(layer.adapter_forward(x), expected, rtol=1e-4, atol=1e-4)


# SDXL self/cross attention, LLaMA's MLP down-projection (types 1 and 6 only: 2-4 reuse their
# operators, and each dense check at that size costs a second), and odd shapes.
MORA_SHAPES = [(t, o, i) for t in MORA_TYPES
               for o, i in [(640, 640), (1280, 1280), (640, 2048), (1280, 2048), (37, 53), (53, 37)]]
MORA_SHAPES += [(1, 4096, 11008), (6, 4096, 11008)]


@pytest.mark.parametrize("t,d_out,d_in", MORA_SHAPES)
def test_mora_forward_equals_explicit_delta(t, d_out, d_in):
    r = 8 if d_out > 100 else 2
    layer = MoRALayer(nn.Linear(d_in, d_out, bias=False), dp.MoRAConfig(r=r, mora_type=t))
    assert layer.r_hat == mora_rank(d_in, d_out, r, t) and layer.trainable_count() == layer.r_hat ** 2
    assert layer.M.abs().sum() == 0  # zero init, and yet M gets gradient at step 0:
    x = torch.randn(2, 5, d_in)
    layer.adapter_forward(x).sum().backward()
    assert layer.M.grad.abs().sum() > 0
    with torch.no_grad():
        layer.M.copy_(torch.randn_like(layer.M) / layer.r_hat)
        dw = layer.delta_weight()
        torch.testing.assert_close(layer.adapter_forward(x), x @ dw.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", MORA_TYPES)
@pytest.mark.parametrize("d_out,d_in", [(640, 640), (53, 37), (37, 53), (90, 20), (1280, 2048)])
def test_mora_gradients_equal_the_explicit_delta_gradients(t, d_out, d_in):
    r = 8 if d_out > 100 else 2
    layer = MoRALayer(nn.Linear(d_in, d_out, bias=False), dp.MoRAConfig(r=r, mora_type=t))
    with torch.no_grad():
        layer.M.copy_(torch.randn_like(layer.M) / layer.r_hat)
    x, g = torch.randn(3, 4, d_in), torch.randn(3, 4, d_out)
    grads = []
    for fn in (layer.adapter_forward, lambda v: v @ layer.delta_weight().T):
        xi = x.clone().requires_grad_()
        fn(xi).backward(g)
        grads.append((xi.grad, layer.M.grad.clone()))
        layer.M.grad = None
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("d_out,d_in", [(640, 640), (53, 37), (37, 53), (90, 20), (1280, 2048)])
def test_mora_rotated_m_path_is_exact_in_forward_and_backward(d_out, d_in):
    """Type 6 with many tokens (≥ r̂) folds the rotations into M; it must compute what rotating
    the activations computes, and what the explicit ΔW computes, values and gradients. The three
    sum in different orders: float32 puts them up to 1.0e-6 of the largest value apart (3 seeds
    per shape), and a fixed 1e-4 failed one element in 26,244 of the 2048-wide case (1.3e-4)."""
    torch.manual_seed(d_out + d_in)
    r = 8 if d_out > 100 else 2
    layer = MoRALayer(nn.Linear(d_in, d_out, bias=False), dp.MoRAConfig(r=r, mora_type=6))
    with torch.no_grad():
        layer.M.copy_(torch.randn_like(layer.M) / layer.r_hat)
    tokens = FOLD_TOKENS * layer.r_hat  # the folded path
    x, g = torch.randn(2, tokens // 2, d_in), torch.randn(2, tokens // 2, d_out)
    paths = {"folded": layer.adapter_forward,
             "rotated activations": lambda v: layer.decompress(F.linear(layer.compress(v), layer.M)),
             "explicit": lambda v: v @ layer.delta_weight().T}
    results = {}
    for name, fn in paths.items():
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(g)
        results[name] = (y.detach(), xi.grad, layer.M.grad.clone())
        layer.M.grad = None
    for name in ("rotated activations", "explicit"):
        for got, want in zip(results["folded"], results[name]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_mora_rank_rounding():
    assert mora_rank(640, 640, 8, 1) == 101 and mora_rank(640, 640, 8, 6) == 100
    assert mora_rank(4096, 11008, 8, 6) == 348
    with pytest.raises(dp.ConfigError, match="r̂=.*must lie in"):
        _layer(MoRALayer, 200, 10, dp.MoRAConfig(r=8))


# ---------------------------------------------------------------- LoRA-Dash
@pytest.mark.parametrize("make,match", [
    (lambda: dp.FourierFTConfig(init="uniform"), r"init = 'uniform' is not a valid choice"),
    (lambda: dp.FourierFTConfig(n_frequency=0), "n_frequency must be >= 1"),
    (lambda: dp.MoRAConfig(mora_type=5), r"mora_type = 5 is not a valid choice among 1, 2, 3, 4, 6"),
])
def test_other_invalid_configs(make, match):
    with pytest.raises(dp.ConfigError, match=match):
        make()

