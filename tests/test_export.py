"""diffusers-format LoRA export, loaded back through diffusers' own load_lora_weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import dreampeft as dp
from dreampeft.export import DIFFUSERS_WEIGHTS, export_diffusers

from .cases import randomize_adapters
from .test_dreambooth import unet_output

CONFIGS = {
    "lora": dp.LoRAConfig(r=3, alpha=6.0),  # alpha ≠ r: the scale must survive the trip
    "lora_dash": dp.LoRADashConfig(r=3, n_directions=2),
    "fourierft": dp.FourierFTConfig(n_frequency=200, scaling=10.0),
    "mora": dp.MoRAConfig(r=2),
    "dora": dp.DoRAConfig(r=3, alpha=6.0),
}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _pipe(path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _adapted(path, method, unet_targets=dp.UNET_ATTENTION, **options):
    pipe = _pipe(path)
    for i, comp in enumerate(COMPONENTS):
        targets = unet_targets if comp == "unet" else dp.CLIP_ATTENTION
        dp.inject_adapters(getattr(pipe, comp), CONFIGS[method].replace(target_modules=list(targets), **options))
        randomize_adapters(getattr(pipe, comp), seed=i)
    return pipe


def _text_out(pipe, comp):
    ids = torch.randint(0, 900, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return getattr(pipe, comp)(ids)[0]


@pytest.mark.parametrize("method, targets", [("lora", "attention"), ("lora_dash", "attention"),
                                             ("lora", "transformer"),  # + feed-forward, proj_in/out
                                             ("lora", "resnets"), ("lora_dash", "resnets")])  # LoCon: convs, time_emb_proj
def test_exact_methods_load_identically_in_diffusers(method, targets, tiny_sdxl, tmp_path):
    ours = _adapted(tiny_sdxl, method, dp.UNET_TARGET_SETS[targets])
    report = export_diffusers({c: getattr(ours, c) for c in COMPONENTS}, tmp_path)
    assert all(r["exact"] and r["overall_rel_error"] == 0.0 for r in report["components"].values())
    theirs = _pipe(tiny_sdxl)
    theirs.load_lora_weights(tmp_path)
    torch.testing.assert_close(unet_output(theirs), unet_output(ours), rtol=1e-5, atol=1e-6)
    for comp in ("text_encoder", "text_encoder_2"):
        torch.testing.assert_close(_text_out(theirs, comp), _text_out(ours, comp), rtol=1e-5, atol=1e-6)
    with safe_open(tmp_path / DIFFUSERS_WEIGHTS, "pt") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert any(k.startswith("unet.down_blocks.") and k.endswith(".to_q.lora_A.weight") for k in keys) \
        == (targets != "resnets")
    assert any(k.endswith(".ff.net.2.lora_B.weight") for k in keys) == (targets == "transformer")
    rank = 3 if method == "lora" else 5  # LoRA-Dash exports as a rank r+s LoRA
    conv = [k for k in keys if k.endswith(".resnets.0.conv1.lora_A.weight")]
    assert bool(conv) == (targets == "resnets")
    if conv:  # PEFT's Conv2d LoRA shapes: A a 3×3 conv into r channels, B a 1×1 conv back
        with safe_open(tmp_path / DIFFUSERS_WEIGHTS, "pt") as f:
            assert f.get_slice(conv[0]).get_shape()[0] == rank and f.get_slice(conv[0]).get_shape()[2:] == [3, 3]
            assert f.get_slice(conv[0].replace("lora_A", "lora_B")).get_shape()[1:] == [rank, 1, 1]
    # keys follow the module names (transformers 5's CLIP has no text_model wrapper), as peft's do
    te_keys = {k for k in keys if k.startswith("text_encoder.") and "layers.0.self_attn.q_proj.lora_B" in k}
    assert len(te_keys) == 1
    assert meta["unet.r"] == meta["unet.lora_alpha"] == rank


@pytest.mark.parametrize("method", ["fourierft", "mora"])
def test_high_rank_methods_export_svd_with_the_reported_error(method, tiny_sdxl, tmp_path):
    ours = _adapted(tiny_sdxl, method)
    report = export_diffusers({"unet": ours.unet}, tmp_path, rank=8)["components"]["unet"]
    assert not report["exact"] and 0 < report["overall_rel_error"] < 1 and report["ranks"] == [8]
    theirs = _pipe(tiny_sdxl)
    theirs.load_lora_weights(tmp_path)
    for name, layer in list(dp.adapter_layers(ours.unet).items())[:12]:
        loaded = theirs.unet.get_submodule(name)
        adapter = next(iter(loaded.lora_A))
        dw_loaded = loaded.get_delta_weight(adapter)  # what diffusers/peft will add to W0
        dw = layer.delta_weight()
        measured = float((dw - dw_loaded).norm() / dw.norm())
        assert measured == pytest.approx(report["layer_rel_error"][name], abs=1e-4), name


@pytest.mark.parametrize("method", ["fourierft", "mora"])
def test_full_rank_svd_is_exact_and_energy_threshold_varies_ranks(method, tiny_sdxl, tmp_path):
    ours = _adapted(tiny_sdxl, method)
    full = export_diffusers({"unet": ours.unet}, tmp_path / "full", rank=1024)["components"]["unet"]
    assert full["overall_rel_error"] < 1e-5
    theirs = _pipe(tiny_sdxl)
    theirs.load_lora_weights(tmp_path / "full")
    torch.testing.assert_close(unet_output(theirs), unet_output(ours), rtol=1e-3, atol=1e-4)
    part = export_diffusers({"unet": ours.unet}, tmp_path / "e", energy=0.9)["components"]["unet"]
    assert len(part["ranks"]) > 1 and part["max_layer_rel_error"] <= 0.1 ** 0.5 + 1e-6
    again = _pipe(tiny_sdxl)
    again.load_lora_weights(tmp_path / "e")  # per-layer ranks through rank_pattern
    assert not torch.allclose(unet_output(again), unet_output(_pipe(tiny_sdxl)))


def test_export_argument_errors(tiny_sdxl, tmp_path):
    pipe = _pipe(tiny_sdxl)
    with pytest.raises(ValueError, match="no adapters to export"):
        export_diffusers({"unet": pipe.unet}, tmp_path)
    dp.inject_adapters(pipe.unet, dp.MoRAConfig(r=2))
    with pytest.raises(ValueError, match="not both"):
        export_diffusers({"unet": pipe.unet}, tmp_path, rank=4, energy=0.9)
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\]"):
        export_diffusers({"unet": pipe.unet}, tmp_path, energy=1.5)


@pytest.mark.parametrize("method", ["lora", "lora_dash", "fourierft", "dora"])
def test_peft_format_loads_in_peft_with_identical_outputs(method, tiny_sdxl, tmp_path):
    peft = pytest.importorskip("peft")
    ours = _adapted(tiny_sdxl, method)
    dp.save_adapter({c: getattr(ours, c) for c in COMPONENTS}, tmp_path / "run")
    from dreampeft.export import main

    assert main([str(tmp_path / "run"), "--to", "peft", "--base", str(tiny_sdxl), "--out", str(tmp_path / "peft")]) == 0
    fresh = _pipe(tiny_sdxl)
    unet = peft.PeftModel.from_pretrained(fresh.unet, tmp_path / "peft" / "unet")
    te = peft.PeftModel.from_pretrained(fresh.text_encoder, tmp_path / "peft" / "text_encoder")
    fresh.unet, fresh.text_encoder = unet.base_model.model, te.base_model.model
    torch.testing.assert_close(unet_output(fresh), unet_output(ours), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_text_out(fresh, "text_encoder"), _text_out(ours, "text_encoder"),
                               rtol=1e-4, atol=1e-5)


def test_peft_export_refuses_mora(tiny_sdxl, tmp_path):
    from dreampeft.export import export_peft

    ours = _adapted(tiny_sdxl, "mora")
    with pytest.raises(ValueError, match="PEFT has no mora adapter"):
        export_peft({"unet": ours.unet}, tmp_path)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_merged_pipeline_is_exact_for_every_method(method, tiny_sdxl, tmp_path):
    from dreampeft.export import main

    ours = _adapted(tiny_sdxl, method)
    dp.save_adapter({c: getattr(ours, c) for c in COMPONENTS}, tmp_path / "run",
                    extra_metadata={"base_model": str(tiny_sdxl)})
    assert main([str(tmp_path / "run"), "--to", "merged", "--out", str(tmp_path / "merged")]) == 0
    merged = _pipe(tmp_path / "merged")  # a plain pipeline folder: no dreampeft needed to use it
    assert not dp.adapter_layers(merged.unet)
    torch.testing.assert_close(unet_output(merged), unet_output(ours), rtol=1e-4, atol=1e-5)
    for comp in ("text_encoder", "text_encoder_2"):
        torch.testing.assert_close(_text_out(merged, comp), _text_out(ours, comp), rtol=1e-4, atol=1e-5)


def test_export_cli_diffusers_and_errors(tiny_sdxl, tmp_path, capsys):
    from dreampeft.export import main

    ours = _adapted(tiny_sdxl, "mora")
    dp.save_adapter({"unet": ours.unet}, tmp_path / "run")
    assert main([str(tmp_path / "run"), "--to", "diffusers", "--energy", "0.95", "--base", str(tiny_sdxl),
                 "--out", str(tmp_path / "d")]) == 0
    assert "unet: mora rank" in capsys.readouterr().out
    _pipe(tiny_sdxl).load_lora_weights(tmp_path / "d")
    assert main([str(tmp_path / "run"), "--to", "kohya_diff", "--base", str(tiny_sdxl),
                 "--out", str(tmp_path / "k")]) == 0
    assert "whole fp16 weight differences: exact" in capsys.readouterr().out
    assert (tmp_path / "k" / "pytorch_lora_weights_kohya_diff.safetensors").exists()
    assert main([str(tmp_path / "run"), "--to", "merged", "--out", str(tmp_path / "m")]) == 2
    assert "does not name its base model; pass --base" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing"), "--to", "peft", "--base", "x", "--out", str(tmp_path / "p")]) == 2
    assert "dreampeft_adapter.safetensors does not exist" in capsys.readouterr().err
    assert main([str(tmp_path / "run"), "--to", "peft", "--base", str(tmp_path / "no-model"),
                 "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no-model" in err and "Traceback" not in err


@pytest.mark.parametrize("method, size, targets", [  # layers_per_block 1 and 2 (SDXL's)
    ("lora", "tiny", "attention"), ("lora", "medium", "attention"), ("lora_dash", "tiny", "attention"),
    ("lora_dash", "medium", "attention"), ("lora", "medium", "transformer"),  # kohya's default targets
    ("lora", "tiny", "resnets"), ("lora", "medium", "resnets"), ("lora_dash", "tiny", "resnets")])  # LoCon
def test_kohya_file_loads_through_diffusers_sgm_path(method, size, targets, tiny_sdxl, medium_sdxl, tmp_path):
    from dreampeft.export_kohya import export_kohya

    path = tiny_sdxl if size == "tiny" else medium_sdxl
    ours = _adapted(path, method, dp.UNET_TARGET_SETS[targets])
    weights = export_kohya({c: getattr(ours, c) for c in COMPONENTS}, tmp_path)
    with safe_open(weights, "pt") as f:
        keys = set(f.keys())
    attention = targets != "resnets"
    assert any(k.startswith("lora_unet_input_blocks_") and k.endswith("_attn1_to_q.lora_down.weight") for k in keys) \
        == attention
    assert any(k.startswith("lora_unet_middle_block_1_") for k in keys) == attention
    assert any(k.endswith("_1_proj_in.lora_down.weight") for k in keys) == (targets == "transformer")
    if not attention:  # SGM's resnet and sampler names, as A1111 and ComfyUI key LoCon files
        lpb = 1 if size == "tiny" else 2
        for key in ("input_blocks_1_0_in_layers_2", "input_blocks_1_0_emb_layers_1", f"input_blocks_{lpb + 1}_0_op",
                    "middle_block_2_out_layers_3", "output_blocks_0_0_skip_connection", f"output_blocks_{lpb}_2_conv"):
            assert f"lora_unet_{key}.lora_down.weight" in keys, key
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up") for k in keys)
    theirs = _pipe(path)
    theirs.load_lora_weights(tmp_path, weight_name=weights.name)  # diffusers' kohya/SGM converter
    torch.testing.assert_close(unet_output(theirs), unet_output(ours), rtol=1e-5, atol=1e-6)
    for comp in ("text_encoder", "text_encoder_2"):  # trained text encoders included
        torch.testing.assert_close(_text_out(theirs, comp), _text_out(ours, comp), rtol=1e-5, atol=1e-6)


def test_dora_kohya_file_is_the_svd_of_its_update(tiny_sdxl, tmp_path):
    """kohya's format has no magnitude vectors here: DoRA's ΔW goes through the truncated SVD,
    exact at full rank through diffusers' kohya/SGM converter."""
    from dreampeft.export_kohya import export_kohya

    ours = _adapted(tiny_sdxl, "dora")
    factors = dp.export.factorize({"unet": ours.unet})  # DoRA's own factors, as the trainer shares them
    weights = export_kohya({"unet": ours.unet}, tmp_path, rank=1024, factors=factors)
    with safe_open(weights, "pt") as f:
        assert not any("magnitude" in k or "dora" in k for k in f.keys())
    theirs = _pipe(tiny_sdxl)
    theirs.load_lora_weights(tmp_path, weight_name=weights.name)
    torch.testing.assert_close(unet_output(theirs), unet_output(ours), rtol=1e-3, atol=1e-4)


def test_dora_loads_exactly_in_diffusers_unet_and_text_encoders_by_svd(tiny_sdxl, tmp_path):
    """The UNet in DoRA's own format (raw factors + lora_magnitude_vector, use_dora), which
    load_lora_weights reads exactly; text encoders as the SVD of ΔW (diffusers' text-encoder path
    drops magnitudes), exact here because rank 32 is full rank on the tiny encoders."""
    ours = _adapted(tiny_sdxl, "dora")
    report = export_diffusers({c: getattr(ours, c) for c in COMPONENTS}, tmp_path)["components"]
    assert report["unet"]["exact"] and not report["text_encoder"]["exact"]
    with safe_open(tmp_path / DIFFUSERS_WEIGHTS, "pt") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.use_dora"] and not meta["text_encoder.use_dora"]
    assert any(k.startswith("unet.") and k.endswith(".lora_magnitude_vector") for k in keys)
    assert not any(k.startswith("text_encoder") and "magnitude" in k for k in keys)
    theirs = _pipe(tiny_sdxl)
    theirs.load_lora_weights(tmp_path)
    torch.testing.assert_close(unet_output(theirs), unet_output(ours), rtol=1e-5, atol=1e-6)
    for comp in ("text_encoder", "text_encoder_2"):
        torch.testing.assert_close(_text_out(theirs, comp), _text_out(ours, comp), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decay", [0.0, 0.05])  # a flat spectrum (the hard case) and a decaying one
def test_randomised_low_rank_export_is_near_optimal_and_reports_its_exact_error(decay):
    from dreampeft.export import _lowrank

    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(256, 256, generator=g))
    V, _ = torch.linalg.qr(torch.randn(192, 192, generator=g))
    S = torch.exp(-decay * torch.arange(192.0))
    dw = (U[:, :192] * S) @ V.T
    optimal = float(S[16:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())
    state = torch.random.get_rng_state()
    e = _lowrank(dw, 16)
    assert torch.equal(torch.random.get_rng_state(), state)  # the trainer's random stream is untouched
    assert e.rel_error == pytest.approx(float((dw - e.up @ e.down).norm() / dw.norm()), rel=1e-5)
    assert optimal <= e.rel_error + 1e-6 and e.rel_error <= optimal * 1.01 + 1e-4, (optimal, e.rel_error)
    assert e.up.shape == (256, 16) and e.down.shape == (16, 192)


@pytest.mark.parametrize("method", ["fourierft", "mora", "dora"])
def test_kohya_diff_file_is_exact_where_the_lora_file_is_not(method, medium_sdxl, tmp_path):
    """``.diff`` keys under the kohya LoRA file's own names (the ones diffusers' SGM converter reads
    in the test above); adding each to its weight, as ComfyUI's loader does, gives the adapted model."""
    from dreampeft.export_kohya import export_kohya, export_kohya_diff, kohya_key, unet_layout
    from safetensors.torch import load_file

    ours = _adapted(medium_sdxl, method)
    models = {c: getattr(ours, c) for c in COMPONENTS}
    diff = load_file(export_kohya_diff(models, tmp_path, dtype=torch.float32))
    lora = load_file(export_kohya(models, tmp_path, rank=2))
    assert {k[:-len(".diff")] for k in diff} == {k[:-len(".alpha")] for k in lora if k.endswith(".alpha")}
    theirs = _pipe(medium_sdxl)
    with torch.no_grad():
        for comp in COMPONENTS:
            model = getattr(theirs, comp)
            for name in dp.inject.adapter_layers(models[comp]):
                weight = model.get_submodule(name).weight
                weight += diff.pop(f"{kohya_key(comp, name, unet_layout(model))}.diff")
    assert not diff  # every key found its layer
    torch.testing.assert_close(unet_output(theirs), unet_output(ours), rtol=1e-5, atol=1e-5)
    for comp in ("text_encoder", "text_encoder_2"):
        torch.testing.assert_close(_text_out(theirs, comp), _text_out(ours, comp), rtol=1e-5, atol=1e-5)
    (tmp_path / "fp16").mkdir()
    half = load_file(export_kohya_diff(models, tmp_path / "fp16"))
    assert all(t.dtype == torch.float16 for t in half.values())  # the default: what A1111/ComfyUI run in


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_locon_with_its_own_conv_rank_loads_exactly_in_every_format(method, tiny_sdxl, tmp_path):
    """kohya's LoCon: LoRA (or DoRA) on the transformer blocks and on the resnets, the 3×3
    convolutions at their own rank and alpha (conv_dim/conv_alpha). Every format carries both ranks
    and scales: diffusers' loader (rank_pattern; DoRA's conv magnitudes in PEFT's (1, out, 1, 1)
    shape), its kohya converter (DoRA as the SVD of ΔW, exact at full rank), peft (rank/alpha
    patterns), the merged pipeline and the native file."""
    from dreampeft.export import export_peft
    from dreampeft.export_kohya import export_kohya

    peft = pytest.importorskip("peft")
    targets = dp.UNET_TRANSFORMER + dp.UNET_RESNETS
    ours = _adapted(tiny_sdxl, method, targets, conv_r=5, conv_alpha=2.5)
    conv = ours.unet.down_blocks[0].resnets[0].conv1
    shortcut = ours.unet.up_blocks[0].resnets[0].conv_shortcut
    assert conv.lora_A.shape == (5, 32, 3, 3) and conv.scaling == 0.5  # conv_alpha / conv_r
    assert shortcut.lora_A.shape[0] == 3 and shortcut.lora_A.shape[2:] == (1, 1)  # 1×1: --rank and
    assert shortcut.scaling == 2.0  # alpha / r, as the linear layers (kohya's rule)
    models = {c: getattr(ours, c) for c in COMPONENTS}
    expected = unet_output(ours)

    report = export_diffusers(models, tmp_path / "d")["components"]["unet"]
    assert report["exact"] and report["ranks"] == [3, 5]
    with safe_open(tmp_path / "d" / DIFFUSERS_WEIGHTS, "pt") as f:
        magnitudes = [k for k in f.keys() if k == "unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector"]
        assert [f.get_slice(k).get_shape() for k in magnitudes] == ([[1, 32, 1, 1]] if method == "dora" else [])
    theirs = _pipe(tiny_sdxl)
    theirs.load_lora_weights(tmp_path / "d")
    torch.testing.assert_close(unet_output(theirs), expected, rtol=1e-5, atol=1e-6)

    kohya = _pipe(tiny_sdxl)
    kohya.load_lora_weights(tmp_path, weight_name=export_kohya(models, tmp_path, rank=1024).name)
    torch.testing.assert_close(unet_output(kohya), expected, rtol=1e-4, atol=1e-5)

    export_peft({"unet": ours.unet}, tmp_path / "p")
    fresh = _pipe(tiny_sdxl)
    fresh.unet = peft.PeftModel.from_pretrained(fresh.unet, tmp_path / "p" / "unet").base_model.model
    torch.testing.assert_close(unet_output(fresh), expected, rtol=1e-5, atol=1e-6)

    dp.save_adapter(models, tmp_path / "run", extra_metadata={"base_model": str(tiny_sdxl)})
    native = _pipe(tiny_sdxl)
    dp.load_adapter({c: getattr(native, c) for c in COMPONENTS}, tmp_path / "run")
    assert torch.equal(unet_output(native), expected)
    from dreampeft.export import main

    assert main([str(tmp_path / "run"), "--to", "merged", "--out", str(tmp_path / "merged")]) == 0
    torch.testing.assert_close(unet_output(_pipe(tmp_path / "merged")), expected, rtol=1e-4, atol=1e-5)
