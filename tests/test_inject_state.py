"""Injection into the tiny SDXL, config validation, native files and their error messages."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

import dreampeft as dp

from .cases import METHOD_CASES, MLP, build, randomize_adapters, run


def test_unet_gets_four_layers_per_attention_module():
    unet = build("unet")
    n_attention = sum(isinstance(m, Attention) for m in unet.modules())
    names = dp.inject_adapters(unet, dp.LoRAConfig(r=2))
    assert n_attention > 0 and len(names) == 4 * n_attention
    assert {n.rsplit(".", 2)[-1] if n.endswith("to_out.0") else n.rsplit(".", 1)[-1] for n in names} \
        == {"to_q", "to_k", "to_v", "0"}
    # cross-attention to_k/to_v read the 64-wide text features, as in SDXL (2048 there)
    assert {l.in_features for n, l in dp.adapter_layers(unet).items() if "attn2.to_k" in n} == {64}
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == {
        f"{n}.{t}" for n in names for t in ("lora_A", "lora_B")}


@pytest.mark.parametrize("part", ["clip", "clip2"])
def test_both_text_encoders(part):
    te = build(part)
    names = dp.inject_adapters(te, dp.LoRAConfig(r=2, target_modules=list(dp.CLIP_ATTENTION)))
    assert len(names) == 4 * te.config.num_hidden_layers


def test_regex_and_exclusions():
    unet = build("unet")
    cfg = dp.LoRAConfig(target_modules=[], target_regex=r".*attn2\.to_(k|v)",
                        exclude_modules=[r"down_blocks\..*"])
    names = dp.inject_adapters(unet, cfg)
    assert names and all("attn2.to_" in n and not n.startswith("down_blocks") for n in names)


def test_injection_errors_name_the_patterns():
    with pytest.raises(ValueError, match=r"no nn.Linear or nn.Conv2d module of MLP matches \['to_q'\]"):
        dp.inject_adapters(MLP(), dp.LoRAConfig(target_modules=["to_q"]))
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(2, 2, 3), nn.Embedding(4, 4), nn.Conv2d(2, 2, 3, groups=2))
    with pytest.raises(TypeError, match=r"lora adapts nn.Linear or nn.Conv2d layers, but these match too: 2 \(Embedding\)"):
        dp.inject_adapters(model, dp.LoRAConfig(target_modules=["0", "2"]))
    with pytest.raises(TypeError, match=r"mora adapts nn.Linear layers, .*1 \(Conv2d\) \(convolutions take --adapter lora, lora_dash or dora\)"):
        dp.inject_adapters(model, dp.MoRAConfig(target_modules=["0", "1"]))
    with pytest.raises(TypeError, match=r"plain convolutions \(groups=1, zero padding\); this one has groups=2"):
        dp.inject_adapters(model, dp.LoRAConfig(target_modules=["0", "3"]))
    assert not dp.adapter_layers(model)  # all or nothing: layer 0 was not wrapped either
    m = MLP()
    dp.inject_adapters(m, dp.LoRAConfig(target_modules=["up"]))
    with pytest.raises(ValueError, match="already has an adapter"):
        dp.inject_adapters(m, dp.LoRAConfig(target_modules=["up"]), names=["up"])


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 0}, "r must be >= 1"),
    ({"r": 2.5}, r"LoRAConfig.r = 2.5 is not a valid int"),
    ({"alpha": -1.0}, "alpha must be > 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"target_modules": "to_q"}, "target_modules = 'to_q' is not a valid"),
    ({"target_modules": []}, "give target_modules or target_regex"),
    ({"target_regex": "(("}, "not a valid regex"),
])
def test_invalid_configs_raise(kwargs, match):
    with pytest.raises(dp.ConfigError, match=match):
        dp.LoRAConfig(**kwargs)


def test_config_dict_roundtrip_and_unknown_keys():
    cfg = dp.LoRAConfig(r=8, alpha=16)
    assert isinstance(cfg.alpha, float) and cfg.scaling == 2.0
    assert dp.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(dp.ConfigError, match=r"unknown LoRAConfig option\(s\) \['rank'\]; valid:"):
        dp.config_from_dict({"method": "lora", "rank": 4})
    with pytest.raises(dp.ConfigError, match=r"unknown adapter method 'vera'; choose one of"):
        dp.config_from_dict({"method": "vera"})


def _saved_mlp(tmp_path):
    model = MLP()
    dp.inject_adapters(model, dp.LoRAConfig(r=2, target_modules=["up", "down"]))
    randomize_adapters(model)
    dp.save_adapter(model, tmp_path)
    return model


def test_load_onto_other_shapes_raises_before_touching_the_model(tmp_path):
    _saved_mlp(tmp_path)
    other = nn.Module()
    other.up, other.down = nn.Linear(24, 40), nn.Linear(40, 9)
    with pytest.raises(dp.AdapterFileError, match=r"down is 9x40, file has 17x40.*another base model"):
        dp.load_adapter(other, tmp_path)
    assert not dp.adapter_layers(other)
    with pytest.raises(dp.AdapterFileError, match="no module down"):
        dp.load_adapter(nn.Sequential(), tmp_path)


def test_damaged_and_missing_files(tmp_path):
    _saved_mlp(tmp_path)
    weights = tmp_path / "dreampeft_adapter.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(dp.AdapterFileError, match="truncated"):
        dp.load_adapter(MLP(), tmp_path)
    with pytest.raises(dp.AdapterFileError, match="does not exist"):
        dp.load_adapter(MLP(), tmp_path / "nope.safetensors")
    with pytest.raises(dp.AdapterFileError, match="holds no dreampeft_adapter.safetensors"):
        dp.load_adapter(MLP(), tmp_path / "..")


def test_missing_tensor_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    _saved_mlp(tmp_path)
    weights = tmp_path / "dreampeft_adapter.safetensors"
    from safetensors import safe_open
    with safe_open(weights, "pt") as f:
        meta = f.metadata()
    tensors = load_file(weights)
    del tensors["model/down.lora_B"]
    save_file(tensors, weights, metadata=meta)
    with pytest.raises(dp.AdapterFileError, match="lacks 1 tensor.*model/down.lora_B"):
        dp.load_adapter(MLP(), tmp_path)


def test_components_dict_and_single_file(tmp_path):
    unet, te = build("unet"), build("clip")
    dp.inject_adapters(unet, dp.LoRAConfig(r=2))
    dp.inject_adapters(te, dp.LoRAConfig(r=1, target_modules=list(dp.CLIP_ATTENTION)))
    randomize_adapters(unet), randomize_adapters(te, seed=1)
    path = dp.save_adapter({"unet": unet, "text_encoder": te}, tmp_path / "run.safetensors")
    assert path.name == "run.safetensors" and (tmp_path / "run.json").exists()
    unet2, te2 = build("unet"), build("clip")
    dp.load_adapter({"unet": unet2, "text_encoder": te2}, path)
    with torch.no_grad():
        torch.testing.assert_close(run("unet", unet2), run("unet", unet), rtol=0, atol=0)
        torch.testing.assert_close(run("clip", te2), run("clip", te), rtol=0, atol=0)
    with pytest.raises(dp.AdapterFileError, match="pass a dict of models"):
        dp.load_adapter(build("unet"), path)
    with pytest.raises(dp.AdapterFileError, match=r"no adapter for \['text_encoder_2'\]"):
        dp.load_adapter({"text_encoder_2": build("clip2")}, path)


def test_remove_adapters_with_merge_keeps_outputs():
    model = MLP()
    dp.inject_adapters(model, dp.LoRAConfig(r=2, target_modules=["up", "down"]))
    randomize_adapters(model)
    x = torch.randn(4, 24)
    with torch.no_grad():
        out = model(x)
        dp.remove_adapters(model, merge=True)
        assert type(model.up) is nn.Linear and not dp.adapter_layers(model)
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
@torch.no_grad()
def test_merged_copies_write_the_merged_model_and_leave_the_adapted_one_as_it_was(method):
    """What the trainer's merged export saves: inside the block, plain Linear layers whose weights
    give the adapted outputs; after it, the adapter layers (the same objects) and W0 bit for bit."""
    unet = build("unet")
    dp.inject_adapters(unet, METHOD_CASES[method](list(dp.UNET_ATTENTION)))
    randomize_adapters(unet)
    layers, before = dp.adapter_layers(unet), {k: v.clone() for k, v in unet.state_dict().items()}
    out = run("unet", unet)
    with dp.inject.merged_copies(unet):
        assert not dp.adapter_layers(unet) and "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight" \
            in unet.state_dict()  # the plain layout a diffusers UNet saves and loads
        torch.testing.assert_close(run("unet", unet), out, rtol=1e-4, atol=1e-5)
    assert dp.adapter_layers(unet) == layers
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert torch.equal(run("unet", unet), out)
