"""Per-method checks against independent references written from docs/METHODS.md."""

from __future__ import annotations

import math
import threading
import time
from types import SimpleNamespace

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
    the activations computes, and what the explicit ΔW computes, values and gradients."""
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
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mora_rank_rounding():
    assert mora_rank(640, 640, 8, 1) == 101 and mora_rank(640, 640, 8, 6) == 100
    assert mora_rank(4096, 11008, 8, 6) == 348
    with pytest.raises(dp.ConfigError, match="r̂=.*must lie in"):
        _layer(MoRALayer, 200, 10, dp.MoRAConfig(r=8))


# ---------------------------------------------------------------- LoRA-Dash
def _trained_dash(steps=3, on_inject=lambda model: None, **cfg):
    model = build("mlp")
    dp.inject_adapters(model, dp.LoRADashConfig(r=2, n_directions=3, target_modules=["up", "down"], **cfg))
    on_inject(model)
    opt = torch.optim.AdamW(list(dp.adapter_parameters(model)), lr=1e-2)
    for i in range(steps):
        model(torch.randn(8, 24, generator=torch.Generator().manual_seed(i))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_dash_launch_is_output_preserving_and_in_place():
    model, _ = _trained_dash()
    x = torch.randn(6, 24)
    layer = model.up
    ptrs = (layer.dash_U.data_ptr(), layer.dash_Vh.data_ptr(), layer.dash_delta.data_ptr())
    with torch.no_grad():
        before = model(x)
    assert dp.launch_dash(model) == ["up", "down"] and dp.is_dash_active(model)
    assert dp.launch_dash(model) == []  # idempotent
    assert (layer.dash_U.data_ptr(), layer.dash_Vh.data_ptr(), layer.dash_delta.data_ptr()) == ptrs
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_dash_directions_equal_brute_force_ranking():
    model, _ = _trained_dash()
    dp.launch_dash(model)
    for layer in dp.adapter_layers(model).values():
        w0 = layer.base_layer.weight.detach()
        U, S, Vh = torch.linalg.svd(w0, full_matrices=False)
        dw = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
        rates = [abs(float(U[:, i] @ dw @ Vh[i])) / (float(S[i]) + 1e-8) for i in range(len(S))]
        best = sorted(range(len(S)), key=lambda i: -rates[i])[:3]
        torch.testing.assert_close(layer.dash_U, U[:, best])
        torch.testing.assert_close(layer.dash_Vh, Vh[best])


def test_dash_svd_cache_gives_the_same_launch_and_spares_the_svd(tmp_path, monkeypatch):
    """--dash_svd_cache: the launch from stored SVDs equals a fresh one bit for bit; the second run
    on the same base decomposes nothing; a changed W0 or an unreadable file is decomposed anew."""
    from dreampeft.adapters.svd_cache import weight_key

    fresh, _ = _trained_dash()
    dp.launch_dash(fresh)
    first, _ = _trained_dash()
    assert dp.launch_dash(first, tmp_path) == ["up", "down"]
    files = {weight_key(m.base_layer.weight) + ".safetensors" for m in (first.up, first.down)}
    assert {f.name for f in tmp_path.iterdir()} == files  # one file per weight, no temporaries left
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    second, _ = _trained_dash()
    assert dp.dash_step(second, second.up.config.warmup_steps, tmp_path) == ["up", "down"] and calls == []
    for model in (first, second):
        for name in ("up", "down"):
            for buf in ("dash_U", "dash_Vh"):
                assert torch.equal(getattr(getattr(model, name), buf), getattr(getattr(fresh, name), buf))
    (tmp_path / sorted(files)[0]).write_bytes(b"not a safetensors file")
    changed, _ = _trained_dash()
    with torch.no_grad():
        changed.up.base_layer.weight.add_(1e-3)
    dp.launch_dash(changed, tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 3  # the changed up; the broken file again


def test_dash_svd_prefetch_keeps_the_callers_thread_count():
    """After torch.set_num_threads(n) (pytest-xdist workers, a user's script) the thread's SVDs still
    equal the launch's bit for bit: MKL counts threads per thread, and a new one starts from the
    process default, which gave different last bits on the 17×40 weight."""
    from dreampeft.adapters.svd_prefetch import SVDPrefetch

    before = torch.get_num_threads()
    torch.set_num_threads(1 if before > 1 else 2)
    try:
        fresh, _ = _trained_dash()
        dp.launch_dash(fresh)
        started = []
        model, _ = _trained_dash(on_inject=lambda m: started.append(SVDPrefetch.start([m])))
        started[0].join()
        assert started[0].completed == 2
        assert dp.dash_step(model, model.up.config.warmup_steps, None, started[0]) == ["up", "down"]
    finally:
        torch.set_num_threads(before)
    for name in ("up", "down"):
        for buf in ("dash_U", "dash_Vh"):
            assert torch.equal(getattr(getattr(model, name), buf), getattr(getattr(fresh, name), buf))


@pytest.mark.parametrize("cache", [False, True], ids=["in-memory", "svd-cache"])
@pytest.mark.parametrize("when", ["thread-done", "racing", "launch-first", "closed"])
def test_dash_svd_prefetch_gives_the_same_launch_and_decomposes_each_weight_once(tmp_path, monkeypatch, cache, when):
    """--dash_svd_prefetch: W0's SVDs taken in a background thread while training goes on give the
    launch's directions bit for bit, whether the thread has finished, is still running when the
    launch comes (the launch takes over what it has not reached) or was closed; no weight is
    decomposed twice."""
    from dreampeft.adapters.svd_prefetch import SVDPrefetch

    fresh, _ = _trained_dash()
    dp.launch_dash(fresh)
    calls, real_svd = [], torch.linalg.svd

    def svd(*args, **kw):
        calls.append(threading.current_thread().name)
        if when == "racing" and threading.current_thread() is not threading.main_thread():
            time.sleep(0.5)  # the thread is still on "up" when the launch comes: it waits, then takes "down"
        return real_svd(*args, **kw)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    started = []
    if when == "launch-first":
        model, _ = _trained_dash()
        prefetch = SVDPrefetch([model.up, model.down], tmp_path if cache else None)  # not started yet
    else:
        model, _ = _trained_dash(on_inject=lambda m: started.append(SVDPrefetch.start([m], tmp_path if cache else None)))
        prefetch = started[0]
    if when == "thread-done":
        prefetch.join()
        assert prefetch.completed == 2 and prefetch.seconds is not None and len(calls) == 2
    if when == "closed":
        prefetch.close()
    assert dp.dash_step(model, model.up.config.warmup_steps, tmp_path if cache else None, prefetch) == ["up", "down"]
    if when == "launch-first":
        prefetch._thread.start()  # finds nothing left to do
    prefetch.join(timeout=30)
    assert not prefetch._thread.is_alive()
    if when != "closed":  # close() drops what was held: the launch decomposes it again
        assert len(calls) == 2  # each W0 once: by the thread or by the launch
    if when == "racing":  # "up" by the thread, "down" by whichever reached it first
        assert calls[0] == "lora-dash-svd"
    if when == "launch-first":  # the launch came before the thread took anything: it did both
        assert calls == ["MainThread", "MainThread"]
    for name in ("up", "down"):
        for buf in ("dash_U", "dash_Vh"):
            assert torch.equal(getattr(getattr(model, name), buf), getattr(getattr(fresh, name), buf))
    assert SVDPrefetch.start([model]) is None  # nothing left to launch: no thread
    later, _ = _trained_dash(steps=0)
    assert SVDPrefetch.start([later], steps=later.up.config.warmup_steps - 1) is None  # no launch in this run


def test_dash_svd_prefetch_declines_when_memory_is_short_unless_a_cache_keeps_them_on_disk(tmp_path, monkeypatch, capsys):
    import psutil

    from dreampeft.adapters.svd_prefetch import SVDPrefetch, held_bytes

    model, _ = _trained_dash(steps=0)
    need = held_bytes([model.up, model.down])
    assert need == 4 * sum(min(w.shape) * (sum(w.shape) + 1) for w in (model.up.base_layer.weight, model.down.base_layer.weight))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2 * need - 1))
    assert SVDPrefetch.start([model]) is None
    assert "--dash_svd_cache DIR keeps them on disk" in capsys.readouterr().err
    prefetch = SVDPrefetch.start([model], tmp_path)
    prefetch.join(timeout=30)
    assert prefetch.completed == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_dash_delta_trains_only_after_launch_with_the_same_optimizer():
    model, opt = _trained_dash(steps=2)
    assert torch.all(model.up.dash_delta == 0)  # zero gradient before the launch
    dp.launch_dash(model)
    model(torch.randn(8, 24)).pow(2).mean().backward()
    assert model.up.dash_delta.grad.abs().sum() > 0
    opt.step()
    assert model.up.dash_delta.abs().sum() > 0
    up, down = model.up.low_rank_factors(1.0)
    assert up.shape[1] == 2 + 3  # rank r + s: exportable as LoRA
    torch.testing.assert_close(up @ down, model.up.delta_weight())


def test_dash_step_launches_at_warmup_and_reload_keeps_phase(tmp_path):
    model, _ = _trained_dash(steps=0, warmup_steps=4)
    assert dp.dash_step(model, 3) == [] and not dp.is_dash_active(model)
    assert dp.dash_step(model, 4) == ["up", "down"]
    with torch.no_grad():
        model.up.dash_delta.fill_(0.3)
    dp.save_adapter(model, tmp_path)
    fresh = build("mlp")
    dp.load_adapter(fresh, tmp_path)
    assert dp.is_dash_active(fresh) and dp.dash_step(fresh, 10) == []
    torch.testing.assert_close(fresh.up.dash_U, model.up.dash_U, rtol=0, atol=0)
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_dash_trainer_callback_uses_optimizer_steps_and_prefetches():
    model, _ = _trained_dash(steps=0, warmup_steps=2)
    cb = dp.DashCallback()
    cb.on_train_begin(None, SimpleNamespace(global_step=0, max_steps=5), None, model=model)
    prefetch = cb._prefetch
    prefetch.join(timeout=30)
    assert prefetch.completed == 2  # both W0 decomposed before the launch step
    cb.on_step_end(None, SimpleNamespace(global_step=1), None, model=model)
    assert not dp.is_dash_active(model)
    cb.on_step_end(None, SimpleNamespace(global_step=2), None, model=model)
    assert dp.is_dash_active(model) and not prefetch._done  # the launch took what the thread held
    cb.on_train_end(None, None, None)
    assert cb._prefetch is None


@pytest.mark.parametrize("kwargs,match", [
    ({"n_directions": 0}, "n_directions must be >= 1"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
])
def test_dash_invalid_config(kwargs, match):
    with pytest.raises(dp.ConfigError, match=match):
        dp.LoRADashConfig(**kwargs)


@pytest.mark.parametrize("make,match", [
    (lambda: dp.FourierFTConfig(init="uniform"), r"init = 'uniform' is not a valid choice"),
    (lambda: dp.FourierFTConfig(n_frequency=0), "n_frequency must be >= 1"),
    (lambda: dp.MoRAConfig(mora_type=5), r"mora_type = 5 is not a valid choice among 1, 2, 3, 4, 6"),
])
def test_other_invalid_configs(make, match):
    with pytest.raises(dp.ConfigError, match=match):
        make()
