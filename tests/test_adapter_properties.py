"""Properties every adapter method must satisfy (docs/METHODS.md preamble), on every tiny model."""

from __future__ import annotations

import itertools

import pytest
import torch

import dreampeft as dp
from dreampeft.adapters import reference_forward

from .cases import METHOD_CASES, MODEL_TARGETS, adapts_convs, build, example_input, layer_input, randomize_adapters, run

MODELS = ["mlp", "unet", "clip"]
CASES = list(itertools.product(MODELS, sorted(METHOD_CASES))) + [  # + the resnets' convolutions
    ("unet-resnets", m) for m in sorted(METHOD_CASES) if adapts_convs(m)]


def adapted(model_name, method, randomize=True, seed=0):
    model = build(model_name)
    names = dp.inject_adapters(model, METHOD_CASES[method](MODEL_TARGETS[model_name]))
    if randomize:
        randomize_adapters(model, seed)
    return model, names


def test_every_method_has_a_case():
    assert {case.split("-")[0] for case in METHOD_CASES} == set(dp.METHODS)
    assert any(model == "unet-resnets" for model, _ in CASES)  # LoRA, LoRA-Dash and DoRA adapt convolutions


@pytest.mark.parametrize("method", sorted(m for m in dp.METHODS if not adapts_convs(m)))
def test_methods_without_a_conv_form_refuse_convolutions_by_name(method):
    model = build("unet")
    with pytest.raises(TypeError, match=rf"{method} adapts nn.Linear layers, .*conv1 \(Conv2d\).*--adapter lora"):
        dp.inject_adapters(model, METHOD_CASES[method](MODEL_TARGETS["unet-resnets"]))
    assert not dp.adapter_layers(model)  # refused before any layer was wrapped


@pytest.mark.parametrize("model_name,method", CASES)
@torch.no_grad()
def test_identity_at_init(model_name, method):
    base_out = run(model_name, build(model_name))
    model, _ = adapted(model_name, method, randomize=False)
    torch.testing.assert_close(run(model_name, model), base_out, rtol=0, atol=0)


@pytest.mark.parametrize("model_name,method", CASES)
@torch.no_grad()
def test_forward_equals_base_plus_delta(model_name, method):
    model, names = adapted(model_name, method)
    layers = dp.adapter_layers(model)
    assert list(layers) == names
    for name, layer in list(layers.items())[:6]:
        x = layer_input(layer)
        assert layer.delta_weight().dtype == torch.float32
        assert layer.delta_weight().abs().max() > 0, f"{name}: randomized adapter has ΔW = 0"
        torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-5)
        layer.set_scale(0.5)
        torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name,method", CASES)
@torch.no_grad()
def test_merge_unmerge_disable(model_name, method):
    base_out = run(model_name, build(model_name))
    model, _ = adapted(model_name, method)
    w0 = {n: l.base_layer.weight.clone() for n, l in dp.adapter_layers(model).items()}
    out = run(model_name, model)
    assert not torch.allclose(out, base_out, atol=1e-6), "randomized adapter changed nothing"
    with dp.disable_adapters(model):
        torch.testing.assert_close(run(model_name, model), base_out, rtol=0, atol=0)
    dp.merge_adapters(model)
    assert all(l.merged for l in dp.adapter_layers(model).values())
    torch.testing.assert_close(run(model_name, model), out, rtol=1e-4, atol=1e-5)
    dp.unmerge_adapters(model)
    for n, l in dp.adapter_layers(model).items():
        torch.testing.assert_close(l.base_layer.weight, w0[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(run(model_name, model), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name,method", CASES)
def test_training_changes_only_adapter_tensors(model_name, method):
    model, _ = adapted(model_name, method)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".base_layer." not in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss = run(model_name, model, seed=step).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapter_keys = {k for k in before if any(k == t or k.startswith(t + ".") for t in trainable)}
    assert changed and changed <= adapter_keys


@pytest.mark.parametrize("model_name,method", CASES)
@torch.no_grad()
def test_save_load_roundtrip(model_name, method, tmp_path):
    model, names = adapted(model_name, method)
    out = run(model_name, model)
    dp.save_adapter(model, tmp_path)
    fresh = build(model_name)
    manifest = dp.load_adapter(fresh, tmp_path)
    assert list(dp.adapter_layers(fresh)) == names
    assert manifest["components"]["model"]["configs"][0]["method"] == method.split("-")[0]
    torch.testing.assert_close(run(model_name, fresh), out, rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if ".base_layer." in n)


@pytest.mark.parametrize("model_name, method", [("unet", m) for m in sorted(METHOD_CASES)] + [
    (model, m) for model, m in CASES if model == "unet-resnets"])
def test_bf16_base_weights(model_name, method):
    model, _ = adapted(model_name, method)
    ref = run(model_name, model)
    model.to(torch.bfloat16)
    for layer in dp.adapter_layers(model).values():  # adapters stay trainable in float32
        for n, p in layer.named_parameters():
            if not n.startswith("base_layer."):
                p.data = p.data.float()
    inputs = example_input("unet", dtype=torch.bfloat16)
    out = model(**inputs).sample
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in dp.adapter_parameters(model)]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
