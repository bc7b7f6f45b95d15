"""train_dreambooth.py end to end on the tiny SDXL folder: every method, prior preservation,
text-encoder training, exact resume, two processes, and each kind of bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from PIL import Image, ImageDraw

import dreampeft as dp
from dreampeft.dreambooth import DreamBoothConfig
from dreampeft.dreambooth.events import read_events

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_dreambooth  # noqa: E402

METHOD_FLAGS = {
    "lora": ["--rank", "2"],
    "lora_dash": ["--rank", "2", "--dash_warmup_steps", "2", "--dash_directions", "4"],
    "fourierft": ["--n_frequency", "100", "--fourier_scaling", "20", "--learning_rate", "1e-2"],
    "mora": ["--rank", "2", "--mora_type", "6"],
    "dora": ["--rank", "2", "--lora_dropout", "0.1"],
}


def subject_images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # non-square, so random crops really move
        im = Image.new("RGB", (72 + 8 * i, 64), (40, 70, 160))
        ImageDraw.Draw(im).ellipse((10 + 4 * i, 12, 50 + 4 * i, 52), fill=(220, 40, 40))
        im.save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def instance_dir(tmp_path) -> Path:
    return subject_images(tmp_path / "instance")


def base_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--instance_prompt", "a photo of sks toy", "--resolution", "64", "--output_dir", str(out),
            "--max_train_steps", "3", "--events", str(out / "events.jsonl"), *extra]


def unet_output(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return pipe.unet(torch.randn(1, 4, 8, 8, generator=g), 500, torch.randn(1, 5, 64, generator=g),
                         added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=g),
                                            "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}).sample


@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_every_method_trains_saves_and_reloads(method, tiny_sdxl, instance_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "out"
    args = base_args(tiny_sdxl, instance_dir, out, "--adapter", method, *METHOD_FLAGS[method],
                     "--validation_prompt", "a sks toy", "--inference_steps", "2", "--num_validation_images", "1")
    assert train_dreambooth.main(args) == 0
    events = read_events(out / "events.jsonl")
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "done"
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert Path(events[-1]["images"][0]).exists()
    done, card = events[-1], (out / "README.md").read_text()
    assert done["step_seconds_max"] >= done["step_seconds_median"] > 0  # a slow step shows
    kept = done["export_energy_kept"]["unet"]
    assert kept == pytest.approx(1 - done["export_rel_error"]["unet"] ** 2) and f"{kept:.1%}" in card
    assert ("--to merged" in card.split("## How to load")[0]) == (kept < 1)  # lossy exports point to exact ones
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    base = unet_output(pipe)
    manifest = dp.load_adapter({"unet": pipe.unet}, out)
    assert manifest["components"]["unet"]["configs"][0]["method"] == method
    assert manifest["base_model"] == str(tiny_sdxl) and manifest["trained_steps"] == 3
    assert not torch.allclose(unet_output(pipe), base), "training left the UNet unchanged"
    # the diffusers file loads through diffusers' own loader; exact for LoRA and LoRA-Dash
    other = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    other.load_lora_weights(out)
    err = events[-1]["export_rel_error"]["unet"]
    if method in ("lora", "lora_dash"):
        assert err == 0.0
        torch.testing.assert_close(unet_output(other), unet_output(pipe), rtol=1e-5, atol=1e-6)
    else:
        assert 0.0 <= err < 1.0 and json.loads((out / "export_report.json").read_text())["components"]
    card = (out / "README.md").read_text()
    assert f"**{method}**" in card and "a photo of sks toy" in card and "load_lora_weights" in card
    assert "validation/step-000003-0.png" in card
    if method == "lora_dash":
        assert dp.is_dash_active(pipe.unet)  # launched at step 2 of 3, and the phase was saved
        assert any(e.get("dash_launched") for e in events if e["event"] == "step")


def test_cli_subprocess_and_config_file(tiny_sdxl, instance_dir, tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "run.json"
    cfg.write_text('{"adapter": "mora", "adapter_options": {"r": 2, "mora_type": 1}}')
    res = subprocess.run([sys.executable, str(ROOT / "train_dreambooth.py"), "--config", str(cfg),
                          *base_args(tiny_sdxl, instance_dir, out, "--max_train_steps", "2",
                                     "--unet_target_modules", "transformer")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "adapters saved in" in res.stdout
    saved = DreamBoothConfig.from_dict(json.loads((out / "dreambooth_config.json").read_text()))
    assert saved.adapter == "mora" and saved.adapter_options == {"r": 2, "mora_type": 1}
    assert saved.max_train_steps == 2  # the flag overrode nothing in the file, and was kept
    # a named target set is saved as the modules it adapted (kohya's: attention, feed-forward, proj)
    assert saved.unet_target_modules == list(dp.UNET_TRANSFORMER)
    adapted = dp.read_manifest(out)[1]["components"]["unet"]["targets"]
    assert any(n.endswith("ff.net.2") for n in adapted) and any(n.endswith("proj_in") for n in adapted)


def test_prior_preservation_generates_class_images(tiny_sdxl, instance_dir, tmp_path):
    out, class_dir = tmp_path / "out", tmp_path / "class"
    args = base_args(tiny_sdxl, instance_dir, out, "--with_prior_preservation", "--class_prompt",
                     "a photo of a toy", "--class_data_dir", str(class_dir), "--num_class_images", "2",
                     "--inference_steps", "2", "--train_batch_size", "2")
    assert train_dreambooth.main(args) == 0
    assert sorted(p.name for p in class_dir.iterdir()) == ["class-00000.png", "class-00001.png"]
    mtimes = [p.stat().st_mtime for p in class_dir.iterdir()]
    assert train_dreambooth.main(args + ["--output_dir", str(tmp_path / "out2")]) == 0
    assert [p.stat().st_mtime for p in class_dir.iterdir()] == mtimes  # reused, not regenerated


def test_bf16_mixed_precision_keeps_adapters_float32(tiny_sdxl, instance_dir, tmp_path):
    out = tmp_path / "out"
    assert train_dreambooth.main(base_args(tiny_sdxl, instance_dir, out, "--mixed_precision", "bf16",
                                           "--adapter", "lora_dash", "--dash_warmup_steps", "1")) == 0
    tensors = _adapter_tensors(out)
    assert {t.dtype for k, t in tensors.items() if not k.endswith("dash_active")} == {torch.float32}
    losses = [e["loss"] for e in read_events(out / "events.jsonl") if e["event"] == "step"]
    assert len(losses) == 3 and all(l == l and l < 10 for l in losses)  # finite


def test_text_encoder_training_saves_all_components(tiny_sdxl, instance_dir, tmp_path):
    out = tmp_path / "out"
    assert train_dreambooth.main(base_args(tiny_sdxl, instance_dir, out, "--train_text_encoder",
                                           "--text_encoder_lr", "5e-4",
                                           "--extra_exports", "kohya,kohya_diff,peft,merged")) == 0
    assert (out / "pytorch_lora_weights_kohya.safetensors").exists()
    with safe_open(out / "pytorch_lora_weights_kohya_diff.safetensors", "pt") as f:
        assert f.metadata()["ss_network_module"] and all(k.endswith(".diff") for k in f.keys())
        assert any(k.startswith("lora_te2_") for k in f.keys())
    assert sorted(p.name for p in (out / "peft").iterdir()) == ["text_encoder", "text_encoder_2", "unet"]
    from diffusers import StableDiffusionXLPipeline

    merged = StableDiffusionXLPipeline.from_pretrained(out / "merged")  # written from the run's own models
    adapted = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    dp.load_into_pipeline(adapted, out)
    assert not dp.adapter_layers(merged.unet)
    torch.testing.assert_close(unet_output(merged), unet_output(adapted), rtol=1e-4, atol=1e-5)
    manifest = dp.read_manifest(out)[1]
    assert set(manifest["components"]) == {"unet", "text_encoder", "text_encoder_2"}
    targets = manifest["components"]["text_encoder"]["targets"]
    assert len(targets) == 8 and all(n.endswith(dp.CLIP_ATTENTION) for n in targets)


def _adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "dreampeft_adapter.safetensors")


def test_resume_continues_exactly(tiny_sdxl, instance_dir, tmp_path):
    """Interrupted at step 2 and resumed == uninterrupted, with every source of randomness on:
    random crops, flips, gradient accumulation, a linear schedule and a LoRA-Dash launch after
    the interruption. The uninterrupted run takes W0's SVDs from a background thread into
    --dash_svd_cache, the interrupted one at the launch (--no-dash_svd_prefetch): same adapter."""
    flags = ["--adapter", "lora_dash", "--rank", "2", "--dash_warmup_steps", "3", "--dash_directions", "2",
             "--random_flip", "--gradient_accumulation_steps", "2", "--lr_scheduler", "linear",
             "--max_train_steps", "5", "--checkpointing_steps", "2", "--learning_rate", "1e-3"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    cache = tmp_path / "svd"
    assert train_dreambooth.main(base_args(tiny_sdxl, instance_dir, full, *flags, "--dash_svd_cache", str(cache))) == 0
    flags.append("--no-dash_svd_prefetch")
    assert train_dreambooth.main(base_args(tiny_sdxl, instance_dir, broken, *flags)) == 0
    assert len(list(cache.glob("*.safetensors"))) > 0
    launch = [e for e in read_events(full / "events.jsonl") if "dash_launched" in e]
    assert [e["step"] for e in launch] == [3] and launch[0]["dash_launched"] == len(list(cache.glob("*.safetensors")))
    assert launch[0]["dash_launch_seconds"] >= 0 and launch[0]["dash_svd_prefetched"] <= launch[0]["dash_launched"]
    for p in broken.iterdir():  # keep only the first checkpoint, as if killed after step 2
        if p.name != "checkpoint-2":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert train_dreambooth.main(base_args(tiny_sdxl, instance_dir, broken, *flags,
                                           "--resume_from_checkpoint", "latest")) == 0
    a, b = _adapter_tensors(full), _adapter_tensors(broken)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    events = read_events(broken / "events.jsonl")
    assert events[0]["start_step"] == 2


def test_checkpoints_total_limit_and_atomic_names(tiny_sdxl, instance_dir, tmp_path):
    out = tmp_path / "out"
    assert train_dreambooth.main(base_args(tiny_sdxl, instance_dir, out, "--max_train_steps", "7",
                                           "--checkpointing_steps", "2", "--checkpoints_total_limit", "2")) == 0
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-6"]


def test_two_processes_end_with_identical_adapters(tiny_sdxl, instance_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    accelerate = Path(sys.executable).parent / "accelerate"
    res = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          str(ROOT / "train_dreambooth.py"),
                          *base_args(tiny_sdxl, instance_dir, out, "--adapter", "lora_dash",
                                     "--dash_warmup_steps", "1", "--rank", "2")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    events = read_events(out / "events.jsonl")
    assert events[0]["processes"] == 2
    sums = events[-1]["rank_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1] and sums[0][1] > 0


@pytest.mark.parametrize("case,match", [
    ("missing_dir", "--instance_data_dir .*: no such folder"),
    ("empty_dir", "no images found"),
    ("corrupt", r"broken.png: cannot read this image"),
    ("no_model", "--pretrained_model_name_or_path .*: does not exist"),
    ("bad_adapter", r"argument --adapter: invalid choice: 'vera'"),
    ("no_match", r"--unet_target_modules: no nn.Linear or nn.Conv2d module .* matches \['to_qq'\]"),
    ("wrong_method_flag", "--n_frequency applies to --adapter fourierft, not lora"),
    ("conv_for_mora", r"names convolutions \(conv1, conv2, conv_shortcut\), which only --adapter lora, lora_dash or dora adapt"),
    ("class_without_prior", "only apply with --with_prior_preservation"),
    ("fp16_on_cpu", "fp16 needs a CUDA GPU"),
    ("bad_resume", "--resume_from_checkpoint .*: not a checkpoint folder"),
    ("no_bitsandbytes", "--optimizer adamw8bit needs bitsandbytes"),
    ("bad_energy", r"--export_energy must be in \(0, 1\]"),
    ("peft_mora", "PEFT has no mora adapter"),
    ("bad_export", r"extra_exports = \['onnx'\] is not a valid"),
    ("no_masks", "--masked_loss: no instance image has an alpha channel"),
    ("mask_size", r"masks/img0.png: the mask is 40×40 but img0.png is 72×64"),
    ("mask_black", r"masks/img1.png: the mask is all black"),
    ("mask_unreadable", r"masks/img2.png: cannot read this mask"),
    ("buckets_center", "--aspect_buckets with --center_crop"),
    ("ema_decay", r"--ema_decay must be in \(0, 1\)"),
    ("dropout_one", r"--caption_dropout_rate must be in \[0, 1\)"),
    ("tag_dropout_one", r"--caption_tag_dropout_rate must be in \[0, 1\) \(got 1.0\)"),
    ("keep_tokens_negative", r"--keep_tokens must be 0 or more \(got -1\)"),
    ("frac_without_te", "--train_text_encoder_frac only applies with --train_text_encoder"),
    ("mask_dir_alone", "--mask_dir only applies with --masked_loss"),
    ("eval_steps_zero", r"--eval_inference_steps must be >= 1 \(got 0\)"),
])
def test_bad_input_gives_one_clear_line(case, match, tiny_sdxl, instance_dir, tmp_path, capsys):
    if case == "no_bitsandbytes" and __import__("importlib").util.find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes is installed here")
    if case == "fp16_on_cpu" and torch.cuda.is_available():
        pytest.skip("fp16 is allowed on this CUDA machine")
    data, model, extra = instance_dir, tiny_sdxl, []
    if case == "missing_dir":
        data = tmp_path / "nope"
    elif case == "empty_dir":
        data = tmp_path / "empty"
        data.mkdir()
        (data / "notes.json").write_text("{}")
    elif case == "corrupt":
        (instance_dir / "broken.png").write_bytes(b"\x89PNG not really")
    elif case == "no_model":
        model = tmp_path / "no-such-model"
    elif case.startswith("mask_") and case != "mask_dir_alone":
        masks = tmp_path / "masks"
        masks.mkdir()
        for i, size in enumerate([(72, 64), (80, 64), (88, 64)]):
            Image.new("L", (40, 40) if case == "mask_size" else size, 255).save(masks / f"img{i}.png")
        Image.new("L", (80, 64), 0).save(masks / "img1.png") if case == "mask_black" else None
        (masks / "img2.png").write_bytes(b"not a png") if case == "mask_unreadable" else None
        extra = ["--masked_loss", "--mask_dir", str(masks)]
    extra = {"bad_adapter": ["--adapter", "vera"], "no_match": ["--unet_target_modules", "to_qq"],
             "conv_for_mora": ["--adapter", "mora", "--unet_target_modules", "transformer,resnets"],
             "wrong_method_flag": ["--n_frequency", "10"], "class_without_prior": ["--class_prompt", "a toy"],
             "fp16_on_cpu": ["--mixed_precision", "fp16"],
             "bad_resume": ["--resume_from_checkpoint", str(tmp_path)],
             "no_bitsandbytes": ["--optimizer", "adamw8bit"],
             "bad_energy": ["--export_energy", "1.5"],
             "peft_mora": ["--adapter", "mora", "--extra_exports", "peft"],
             "bad_export": ["--extra_exports", "onnx"], "no_masks": ["--masked_loss"],
             "buckets_center": ["--aspect_buckets", "--center_crop"], "ema_decay": ["--use_ema", "--ema_decay", "1"],
             "dropout_one": ["--caption_dropout_rate", "1"], "tag_dropout_one": ["--caption_tag_dropout_rate", "1"],
             "keep_tokens_negative": ["--keep_tokens", "-1"], "frac_without_te": ["--train_text_encoder_frac", "0.5"],
             "mask_dir_alone": ["--mask_dir", str(tmp_path)],
             "eval_steps_zero": ["--eval_inference_steps", "0"]}.get(case, extra)
    try:
        code = train_dreambooth.main(base_args(model, data, tmp_path / "out", *extra))
    except SystemExit as exc:  # argparse's own errors (invalid choice) exit with 2 too
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(match, err), err
    assert "Traceback" not in err
