"""LoRA-Dash's phase change (docs/METHODS.md §2): the launch, its SVD cache and background prefetch,
the trainer callback and the config checks."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

import dreampeft as dp

from .cases import build


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


def _same_directions(model, fresh) -> bool:
    """The launched directions (U and Vᵀ of both layers) equal ``fresh``'s bit for bit."""
    return all(torch.equal(getattr(getattr(model, name), buf), getattr(getattr(fresh, name), buf))
               for name in ("up", "down") for buf in ("dash_U", "dash_Vh"))


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
    assert _same_directions(first, fresh) and _same_directions(second, fresh)
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
    assert _same_directions(model, fresh)


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
    assert _same_directions(model, fresh)
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
