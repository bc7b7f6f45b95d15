"""Careless and hostile use, entry point by entry point: the exact outcome a user sees (exit status,
the `error:` line naming the file or flag) and the state afterwards (outputs unchanged, run folder
intact, no stray files). Modes at inference, atomic loads, owned run folders, images read right."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import dreampeft as dp
from dreampeft.dreambooth.data import DreamBoothError, load_image
from dreampeft.dreambooth.events import read_events

from .test_dreambooth import ROOT, base_args, instance_dir, subject_images, train_dreambooth, unet_output  # noqa: F401
from .test_export import COMPONENTS, _adapted, _pipe

METHOD_CONFIGS = {  # dropout on where the method has it: inference must switch it off
    "lora": dp.LoRAConfig(r=2, dropout=0.5),
    "lora_dash": dp.LoRADashConfig(r=2, dropout=0.5, n_directions=2),
    "fourierft": dp.FourierFTConfig(n_frequency=50, scaling=10.0),
    "mora": dp.MoRAConfig(r=2),
}


def _saved(tiny_sdxl, tmp_path, method: str, name: str = "run") -> Path:
    """An adapter with non-zero ΔW, saved from the tiny SDXL's UNet."""
    pipe = _pipe(tiny_sdxl)
    dp.inject_adapters(pipe.unet, METHOD_CONFIGS[method])
    torch.manual_seed(1)
    with torch.no_grad():
        for p in dp.adapter_parameters(pipe.unet):
            p.add_(torch.randn_like(p) * 0.05)
    return dp.save_adapter({"unet": pipe.unet}, tmp_path / name).parent


# -- 1. modes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_loaded_adapters_are_deterministic_frozen_and_in_eval_mode(method, tiny_sdxl, tmp_path):
    path = _saved(tiny_sdxl, tmp_path, method)
    pipe = _pipe(tiny_sdxl)
    base = unet_output(pipe)
    dp.load_into_pipeline(pipe, path)
    layers = dp.adapter_layers(pipe.unet).values()
    assert not any(layer.training for layer in layers)
    assert not any(p.requires_grad for p in dp.adapter_parameters(pipe.unet))
    first = unet_output(pipe)
    torch.testing.assert_close(unet_output(pipe), first, rtol=0, atol=0)  # no dropout left on
    assert not torch.allclose(first, base)


def test_injected_layers_take_the_models_mode(tiny_sdxl):
    pipe = _pipe(tiny_sdxl)  # from_pretrained: eval mode
    dp.inject_adapters(pipe.unet, METHOD_CONFIGS["lora"])
    assert not any(layer.training for layer in dp.adapter_layers(pipe.unet).values())
    with dp.inject.eval_mode(pipe.unet.train()):
        assert not pipe.unet.training
    assert all(m.training for m in pipe.unet.modules())  # every submodule got its mode back


def test_text_encoder_gradient_checkpointing_really_checkpoints(tiny_sdxl, instance_dir, tmp_path):
    from dreampeft.dreambooth import parse_config
    from dreampeft.dreambooth.batch import compute_loss
    from dreampeft.dreambooth.train import make_accelerator, setup

    cfg = parse_config(base_args(tiny_sdxl, instance_dir, tmp_path / "out", "--train_text_encoder",
                                 "--gradient_checkpointing", "--lora_dropout", "0.1"))
    run = setup(cfg, make_accelerator(cfg))
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls, layers = [], [m for n in ("text_encoder", "text_encoder_2") for m in run.trained[n].modules()
                         if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=inner, **k: calls.append(1) or _f(*a, **k)
    compute_loss(run, 0).backward()
    assert len(layers) >= 4 and len(calls) == len(layers)  # every encoder layer, once
    assert all(m.training for m in run.trained.values()) and not run.parts.vae.training


# -- 2. one atomic loading path -------------------------------------------------------------------
def _damage(path: Path, case: str) -> None:
    weights = path / "dreampeft_adapter.safetensors"
    tensors = load_file(weights)
    header = json.loads((path / "dreampeft_adapter.json").read_text())
    key = sorted(tensors)[-1]
    if case == "missing":
        del tensors[key]
    elif case == "extra":
        tensors["unet/nowhere.lora_A"] = torch.zeros(2, 2)
    elif case == "misshaped":
        tensors[key] = torch.zeros(tensors[key].numel() + 1)
    elif case == "nan":
        tensors[key] = tensors[key].clone().fill_(float("nan"))
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        return
    text = "{not json" if case == "bad_json" else json.dumps(header)
    save_file(tensors, weights, metadata={"format": "pt", "dreampeft-adapter": text})


DAMAGE = {"missing": "lacks 1 tensor", "extra": "unexpected tensor", "misshaped": "has shape",
          "nan": "NaN or inf", "bad_json": "not valid JSON", "truncated": "not a readable safetensors"}


@pytest.mark.parametrize("second", [False, True], ids=["first", "second"])
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_failed_load_leaves_the_pipeline_as_it_was(case, second, tiny_sdxl, tmp_path):
    pipe = _pipe(tiny_sdxl)
    if second:
        dp.load_into_pipeline(pipe, _saved(tiny_sdxl, tmp_path, "lora", "good"), adapter_name="good")
    before, names, modules = unet_output(pipe), list(dp.pipeline.registry(pipe)), dict(pipe.unet.named_modules())
    bad = _saved(tiny_sdxl, tmp_path, "mora", "bad")
    _damage(bad, case)
    with pytest.raises(dp.AdapterFileError, match=f"{bad}.*{DAMAGE[case]}"):
        dp.load_into_pipeline(pipe, bad, adapter_name="bad")
    torch.testing.assert_close(unet_output(pipe), before, rtol=0, atol=0)
    assert list(dp.pipeline.registry(pipe)) == names
    assert dict(pipe.unet.named_modules()).keys() == modules.keys()
    dp.unload(pipe)
    assert not dp.adapter_layers(pipe.unet)


def test_a_file_saved_with_other_options_is_refused(tiny_sdxl, tmp_path):
    trained = _adapted(tiny_sdxl, "lora")  # r 3, alpha 6
    dp.save_adapter({"unet": trained.unet}, tmp_path / "a")
    pipe = _pipe(tiny_sdxl)
    dp.inject_adapters(pipe.unet, dp.LoRAConfig(r=3, alpha=8.0))  # same shapes, another scale
    before = unet_output(pipe)
    with pytest.raises(dp.AdapterFileError, match=r"other unet adapter options .*alpha 8.0 vs file 6.0"):
        dp.load_adapter({"unet": pipe.unet}, tmp_path / "a")
    torch.testing.assert_close(unet_output(pipe), before, rtol=0, atol=0)


def test_a_failing_second_component_changes_no_component(tiny_sdxl, tmp_path):
    ours = _adapted(tiny_sdxl, "lora")
    dp.save_adapter({c: getattr(ours, c) for c in COMPONENTS}, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "dreampeft_adapter.safetensors")
    header = (tmp_path / "a" / "dreampeft_adapter.json").read_text()
    last = sorted(k for k in tensors if k.startswith("text_encoder_2/"))[-1]
    del tensors[last]
    save_file(tensors, tmp_path / "a" / "dreampeft_adapter.safetensors",
              metadata={"format": "pt", "dreampeft-adapter": header})
    pipe = _pipe(tiny_sdxl)
    with pytest.raises(dp.AdapterFileError, match="lacks 1 tensor"):
        dp.load_into_pipeline(pipe, tmp_path / "a")
    assert not any(dp.adapter_layers(getattr(pipe, c)) for c in COMPONENTS)


# -- 3. run folders ----------------------------------------------------------------------------------
def _main(args, capsys) -> tuple[int, str]:
    try:
        code = train_dreambooth.main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "events.jsonl"}


def test_run_folders_are_owned(tiny_sdxl, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _main(base_args(tiny_sdxl, instance_dir, out, "--checkpointing_steps", "2"), capsys)[0] == 0
    finished = _files(out)
    code, err = _main(base_args(tiny_sdxl, instance_dir, out, "--learning_rate", "1e-3"), capsys)
    assert code == 2 and f"--output_dir {out} already holds a finished run" in err
    assert _files(out) == finished  # refused before anything was touched
    code, err = _main(base_args(tiny_sdxl, instance_dir, out, "--learning_rate", "1e-3",
                                "--resume_from_checkpoint", "latest"), capsys)
    assert code == 2 and "--learning_rate 0.0001 → 0.001" in err and _files(out) == finished
    (out / "validation").mkdir()
    (out / "validation" / "old.png").write_bytes(b"x")
    assert _main(base_args(tiny_sdxl, instance_dir, out, "--overwrite_output_dir", "--max_train_steps", "1"),
                 capsys)[0] == 0
    assert not (out / "checkpoint-2").exists() and not (out / "validation" / "old.png").exists()
    assert json.loads((out / "dreambooth_config.json").read_text())["max_train_steps"] == 1
    card = (out / "README.md").read_text()  # the hub's LoRA front matter
    assert card.startswith(f'---\nbase_model: "{tiny_sdxl}"\nlibrary_name: diffusers\n'
                           'instance_prompt: "a photo of sks toy"\ntags:\n')
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_second_trainer_on_the_same_folder_stops_at_once(tiny_sdxl, instance_dir, tmp_path, capsys):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".dreampeft.lock", "a+") as held:  # as a running trainer holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        start = time.time()
        code, err = _main(base_args(tiny_sdxl, instance_dir, out), capsys)
    assert code == 2 and "another training run (pid 4242) is using this folder" in err
    assert time.time() - start < 30 and not (out / "dreampeft_adapter.safetensors").exists()


def test_resume_latest_without_a_checkpoint(tiny_sdxl, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _main(base_args(tiny_sdxl, instance_dir, out, "--resume_from_checkpoint", "latest"), capsys)
    assert code == 0 and "no checkpoint in" in err and "starting at step 0" in err
    code, err = _main(base_args(tiny_sdxl, instance_dir, out, "--resume_from_checkpoint", "latest"), capsys)
    assert code == 2 and "holds a finished run and no checkpoint to continue from" in err


@pytest.mark.parametrize("fail_after", [0, 2, 5, 99])
def test_an_interrupted_final_commit_recovers_whole(fail_after, tmp_path, monkeypatch):
    """A crash anywhere in the commit leaves, after recovery, the old run or the new one: never a mix."""
    from dreampeft.dreambooth import rundir

    out = tmp_path / "out"
    out.mkdir()
    old = {n: b"old" for n in ("dreampeft_adapter.safetensors", "dreampeft_adapter.json", "README.md",
                               "pytorch_lora_weights.safetensors")}
    for n, b in old.items():
        (out / n).write_bytes(b)
    staged = rundir.stage(out)
    new = {n: b"new" for n in ("dreampeft_adapter.safetensors", "dreampeft_adapter.json", "README.md",
                               "export_report.json")}
    for n, b in new.items():
        (staged / n).write_bytes(b)
    real, moves = os.replace, []

    def crashing_replace(a, b):
        if len(moves) == fail_after:
            raise KeyboardInterrupt("crash")
        moves.append(a)
        real(a, b)

    monkeypatch.setattr(rundir.os, "replace", crashing_replace)
    try:
        rundir.commit(out)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(rundir.os, "replace", real)
    rundir.recover(out)
    state = {p.name: p.read_bytes() for p in out.iterdir()}
    assert state in (old, new), state


# -- 4 and 5. images, and every failure one line and an event -----------------------------------------
def _png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit PNG (PIL writes 16-bit grayscale only; this writes colour too)."""
    import struct
    import zlib

    arr = np.asarray(arr, dtype=">u2")
    h, w = arr.shape[:2]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + arr[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if arr.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


IMAGE_CASES = {  # writer, expected mean RGB
    "gray16.png": (lambda p: _png16(p, np.full((40, 40), 32896)), (128, 128, 128)),
    "rgb16.png": (lambda p: _png16(p, np.dstack([np.full((40, 40), v) for v in (65535, 32896, 0)])),
                  (255, 128, 0)),
    "gray16.tif": (lambda p: Image.fromarray(np.full((40, 40), 16448, np.uint16)).save(p), (64, 64, 64)),
    "float.tif": (lambda p: Image.fromarray(np.full((40, 40), 0.75, np.float32)).save(p), (191, 191, 191)),
}


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_16bit_and_float_images_are_scaled_not_clipped(name, tmp_path):
    write, expected = IMAGE_CASES[name]
    write(tmp_path / name)
    pixels = np.asarray(load_image(tmp_path / name), dtype=np.float64)
    assert pixels.shape == (40, 40, 3)
    np.testing.assert_allclose(pixels.mean(axis=(0, 1)), expected, atol=1)


@pytest.mark.parametrize("size,match", [((1, 1), "1×1 is too small"), ((9000, 8000), "69 megapixels, over")])
def test_tiny_and_huge_images_are_refused_everywhere(size, match, tiny_sdxl, tmp_path, capsys):
    from dreampeft.app.forms import UploadError, check_uploads
    from dreampeft.eval.__main__ import main as eval_main

    folder = subject_images(tmp_path / "data")
    Image.new("L", size).save(folder / "odd.png")
    code, err = _main(base_args(tiny_sdxl, folder, tmp_path / "out"), capsys)
    assert code == 2 and f"{folder / 'odd.png'}: {size[0]}×{size[1]}" in err and match in err
    assert eval_main(["--real", str(folder), "--generated", str(folder)]) == 2
    assert match in capsys.readouterr().err
    with pytest.raises(UploadError, match=f"odd.png: .*{match}"):
        check_uploads([str(folder / "odd.png")])
    with pytest.raises(DreamBoothError, match=match):
        load_image(folder / "odd.png")


@pytest.mark.parametrize("case", ["events_is_folder", "config_is_folder", "output_under_a_file",
                                  "corrupt_trainer_state"])
def test_failures_are_one_line_and_an_event(case, tiny_sdxl, instance_dir, tmp_path, capsys):
    out, extra = tmp_path / "out", []
    args = base_args(tiny_sdxl, instance_dir, out)
    if case == "events_is_folder":
        args[args.index("--events") + 1] = str(tmp_path)
    elif case == "config_is_folder":
        extra = ["--config", str(tmp_path)]
    elif case == "output_under_a_file":
        (tmp_path / "file").write_text("x")
        args[args.index("--output_dir") + 1] = str(tmp_path / "file" / "out")
        args[args.index("--events") + 1] = str(tmp_path / "events.jsonl")
    elif case == "corrupt_trainer_state":
        assert _main(base_args(tiny_sdxl, instance_dir, out, "--checkpointing_steps", "2"), capsys)[0] == 0
        (out / "checkpoint-2" / "trainer_state.pt").write_bytes(b"garbage")
        (out / "dreampeft_adapter.safetensors").unlink()
        extra = ["--resume_from_checkpoint", "latest"]
    code, err = _main(args + extra, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    expected = {"events_is_folder": f"--events {tmp_path}: cannot write it",
                "config_is_folder": f"--config {tmp_path}: is a folder",
                "output_under_a_file": f"--output_dir {tmp_path / 'file' / 'out'}: cannot write there",
                "corrupt_trainer_state": f"{out / 'checkpoint-2' / 'trainer_state.pt'}: cannot restore"}[case]
    assert expected in lines[0]
    if case in ("output_under_a_file", "corrupt_trainer_state"):
        events = read_events(Path(args[args.index("--events") + 1]))
        assert events[-1]["event"] == "error" and expected in events[-1]["message"]
    if case == "corrupt_trainer_state":
        assert (out / "checkpoint-2" / "dreampeft_adapter.safetensors").exists()


def _as_in_a_terminal():
    # A shell without job control starts background commands with SIGINT ignored, and a Python
    # started that way never raises KeyboardInterrupt: `make test &` or a CI runner made this test's
    # Ctrl-C a no-op (the child trained on until the timeout; its stacks showed it in backward).
    # A user's Ctrl-C comes from a terminal, where SIGINT has its default action.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 2), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_stop_cleanly(sig, code, tiny_sdxl, instance_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_dreambooth.py"),
                             *base_args(tiny_sdxl, instance_dir, out, "--max_train_steps", "100000",
                                        "--checkpointing_steps", "2")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"}, preexec_fn=_as_in_a_terminal)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint-2").exists():
        time.sleep(0.2)
    proc.send_signal(sig)
    try:  # 60 s and once 180 s ran out on a loaded 2-core machine: a hang, not a slow step
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:  # SIGABRT makes faulthandler print where every thread is stuck
        proc.send_signal(signal.SIGABRT)
        pytest.fail("no exit 180 s after the signal; the stacks:\n" + proc.communicate(timeout=60)[1][-6000:])
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")][-1].endswith(
        "continue with --resume_from_checkpoint latest")
    last = read_events(out / "events.jsonl")[-1]
    assert last["event"] == "stopped" and last["checkpoint"].startswith(str(out / "checkpoint-"))
    assert (Path(last["checkpoint"]) / "trainer_state.pt").exists()


def test_a_stop_signal_whose_raise_was_lost_still_stops_the_run(tiny_sdxl, instance_dir, tmp_path, monkeypatch,
                                                                capsys):
    """The handler's raise can land in a finaliser and be lost ("Exception ignored"; a Ctrl-C in CI
    once left a run training on): the signal is kept, and the loop stops the run at the next step,
    as if the raise had arrived — exit 2, a "stopped" event naming the last checkpoint."""
    import importlib

    from dreampeft.dreambooth import stop

    trainer = importlib.import_module("dreampeft.dreambooth.train")  # the package exports train(), the function

    real = trainer.train_step

    def step_then_lost_signal(run, step):
        result = real(run, step)
        if step == 2:  # after step 3's checkpoint-2 exists; the signal recorded, its raise swallowed
            stop._ASKED.append(signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer, "train_step", step_then_lost_signal)
    out = tmp_path / "out"
    assert train_dreambooth.main(base_args(tiny_sdxl, instance_dir, out, "--max_train_steps", "50",
                                           "--checkpointing_steps", "2")) == 2
    assert "continue with --resume_from_checkpoint latest" in capsys.readouterr().err
    events = read_events(out / "events.jsonl")
    assert max(e["step"] for e in events if e["event"] == "step") == 3
    assert events[-1]["event"] == "stopped" and events[-1]["checkpoint"].endswith("checkpoint-2")
    assert not stop._ASKED  # nothing left over for the next run in this process


# -- 6. export CLI -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,match", [
    (["--rank", "0"], "0 keeps nothing; use a rank of 1 or more"),
    (["--rank", "100000"], "above every layer's full rank"),
    (["--energy", "0"], r"0.0 keeps nothing; give the share .* in \(0, 1\]"),
    (["--energy", "1.5"], r"1.5 is outside \(0, 1\]"),
    (["--out", "FILE"], "--out .*FILE is a file; give a folder"),
    (["--to", "merged", "--out", "FULL"], "FULL exists and is not an empty folder"),
])
def test_export_cli_validates(flags, match, tiny_sdxl, tmp_path, capsys):
    from dreampeft.export import main

    src = _saved(tiny_sdxl, tmp_path, "mora")
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "keep.txt").write_text("mine")
    flags = [str(tmp_path / f) if f in ("FILE", "FULL") else f for f in flags]
    args = [str(src), "--base", str(tiny_sdxl), "--to", "diffusers", "--out", str(tmp_path / "x"), *flags]
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and __import__("re").search(match, err), err
    assert (tmp_path / "FULL" / "keep.txt").read_text() == "mine"


def test_json_config_takes_method_options_by_their_flag_names(tiny_sdxl, instance_dir, tmp_path):
    from dreampeft.dreambooth import parse_config

    (tmp_path / "c.json").write_text('{"adapter": "fourierft", "n_frequency": 64, "fourier_scaling": 3.0}')
    cfg = parse_config(["--config", str(tmp_path / "c.json"),
                        *base_args(tiny_sdxl, instance_dir, tmp_path / "o", "--fourier_scaling", "5")])
    assert cfg.adapter_options == {"n_frequency": 64, "scaling": 5.0}


# -- 10, 11. fp16 bases, event logs ----------------------------------------------------------------
def test_a_base_saved_in_fp16_trains_with_generated_class_images(tiny_sdxl, instance_dir, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    from dreampeft.dreambooth import parse_config
    from dreampeft.dreambooth.models import load_parts

    half = tmp_path / "half"
    StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, torch_dtype=torch.float16).save_pretrained(half)
    args = base_args(half, instance_dir, tmp_path / "out", "--with_prior_preservation", "--class_prompt",
                     "a photo of a toy", "--class_data_dir", tmp_path / "cls", "--num_class_images", "2",
                     "--inference_steps", "2", "--max_train_steps", "1")
    parts = load_parts(parse_config([str(a) for a in args]))
    assert {p.dtype for m in (*parts.text_encoders, parts.vae, parts.unet) for p in m.parameters()} == {torch.float32}
    code, err = _main(args, capsys)
    assert code == 0, err
    assert len(list((tmp_path / "cls").glob("*.png"))) == 2


def test_class_images_stopped_midway_leave_whole_images_and_resume(tmp_path, monkeypatch):
    """A run stopped while the base draws class images (the app's Stop, Ctrl-C) — here in the middle
    of writing the third PNG — leaves only whole PNGs; the next run with the folder draws only the
    rest, and its progress counts those."""
    from dreampeft.dreambooth import DreamBoothConfig
    from dreampeft.dreambooth.prior import generate_class_images

    class Base:  # the pipeline's interface: prompts in, PIL images out
        def __call__(self, prompts, generator, **_):
            shade = int(generator.initial_seed()) * 40
            return type("Out", (), {"images": [Image.new("RGB", (32, 32), (shade, 0, 0)) for _ in prompts]})

        def to(self, device):
            return self

    save, saved = Image.Image.save, []

    def stopped_on_the_third(image, fp, *args, **kwargs):
        saved.append(fp)
        if len(saved) == 3:
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n")  # the first bytes, then the stop
            raise KeyboardInterrupt
        return save(image, fp, *args, **kwargs)

    cfg = DreamBoothConfig(pretrained_model_name_or_path="m", instance_data_dir="d", instance_prompt="a sks toy",
                           with_prior_preservation=True, class_prompt="a toy", class_data_dir=str(tmp_path / "cls"),
                           num_class_images=5, sample_batch_size=2)
    monkeypatch.setattr(Image.Image, "save", stopped_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        generate_class_images(cfg, Base(), "cpu")
    monkeypatch.setattr(Image.Image, "save", save)
    assert sorted(p.name for p in (tmp_path / "cls").iterdir()) == ["class-00000.png", "class-00001.png"]
    seen = []
    assert generate_class_images(cfg, Base(), "cpu", progress=lambda *a: seen.append(a)) == 3
    assert seen == [(2, 3), (3, 3)]
    names = sorted(p.name for p in (tmp_path / "cls").iterdir())
    assert names == [f"class-{i:05d}.png" for i in range(5)]
    assert all(load_image(tmp_path / "cls" / n).size == (32, 32) for n in names)


def test_read_events_tolerates_only_a_half_written_last_line(tmp_path):
    log = tmp_path / "e.jsonl"
    log.write_text('{"event": "start"}\n{"event": "step", "step": 1}\n{"event": "st')
    assert [e["event"] for e in read_events(log)] == ["start", "step"]
    log.write_text('{"event": "start"}\ngarbage\n{"event": "done"}\n')
    with pytest.raises(ValueError, match=r"e.jsonl:2: not a JSON event line"):
        read_events(log)


# -- 3 and 7. the app: a folder per job, only shown files served --------------------------------------
def test_the_app_gives_every_job_its_own_folder_at_submission(tiny_sdxl, tmp_path):
    from dreampeft.app import App
    from dreampeft.app.jobs import Job
    from dreampeft.presets import learning_rates

    from .test_app import SUBJECT

    class Recorder:  # stands in for the process queue: what matters here is what it is given
        jobs: list = []

        def submit(self, cfg):
            self.jobs.append(cfg)
            return Job(len(self.jobs), cfg)

    app = App(tmp_path / "work", model=str(tiny_sdxl), queue=Recorder())
    values = [s.default for s in app.specs]
    for _ in range(2):  # a double-click on Train: same methods, same second
        app.train(str(tiny_sdxl), SUBJECT, "a sks toy", "toy", ["lora", "lora"], 2, 64, 0, 0,
                  *learning_rates("sdxl").values(), *values)
    folders = [Path(c.output_dir) for c in app.queue.jobs]
    assert len(folders) == 4 == len(set(folders)) and all(f.is_dir() for f in folders)
    assert all(Path(c.events).parent == Path(c.output_dir) for c in app.queue.jobs)
    assert app.public_dir == tmp_path.resolve() / "work" / "public"
    shown = app.public(SUBJECT[0])  # what the UI shows is copied into the one served folder
    assert Path(shown).is_relative_to(app.public_dir) and Path(shown).read_bytes() == Path(SUBJECT[0]).read_bytes()


# -- crash tests: kill -9 in the middle of a checkpoint and of the final save ---------------------------
KILLER = """
import os, signal, sys, types
sys.path.insert(0, {root!r})
import dreampeft.dreambooth.{module} as m
real, calls = m.{name}.{attr}, [0]
def killer(*a, **k):
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
m.{name} = types.SimpleNamespace(**{{**{{k: getattr(m.{name}, k) for k in dir(m.{name}) if not k.startswith('__')}},
                                    "{attr}": killer}})
import train_dreambooth
sys.exit(train_dreambooth.main(sys.argv[1:]))
"""


def _killed_run(args, module: str, name: str, attr: str, n: int, cwd: Path) -> int:
    code = KILLER.format(root=str(ROOT), module=module, name=name, attr=attr, n=n)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, cwd=cwd,
                          timeout=300).returncode


def test_kill_9_during_a_checkpoint_keeps_the_last_complete_one(tiny_sdxl, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = base_args(tiny_sdxl, instance_dir, out, "--max_train_steps", "5", "--checkpointing_steps", "2")
    assert _killed_run(args, "checkpoint", "torch", "save", 2, tmp_path) == -signal.SIGKILL  # in checkpoint-4
    assert (out / "checkpoint-2" / "trainer_state.pt").exists() and not (out / "checkpoint-4").exists()
    assert _main(args + ["--resume_from_checkpoint", "latest"], capsys)[0] == 0
    assert [e for e in read_events(out / "events.jsonl") if e["event"] == "start"][-1]["start_step"] == 2
    assert not list(out.glob(".checkpoint-*.tmp"))  # the torn one was cleared by the next save


@pytest.mark.parametrize("name,attr,n,expected", [
    ("os", "replace", 3, "old"),  # midway through moving the old outputs aside
    ("os", "replace", 10, "old"),  # midway through moving the new ones in (their adapter is last)
    ("shutil", "rmtree", 1, "new"),  # everything moved in, the old not yet dropped
])
def test_kill_9_during_the_final_save_leaves_one_whole_run(name, attr, n, expected, tiny_sdxl, instance_dir,
                                                            tmp_path, capsys):
    from dreampeft.dreambooth import rundir

    out = tmp_path / "out"
    first = base_args(tiny_sdxl, instance_dir, out, "--checkpointing_steps", "2")
    assert _main(first, capsys)[0] == 0
    old = {n_: (out / n_).read_bytes() for n_ in rundir.FINAL_OUTPUTS if (out / n_).is_file()}
    again = first + ["--resume_from_checkpoint", "latest", "--max_train_steps", "4"]
    assert _killed_run(again, "rundir", name, attr, n, tmp_path) == -signal.SIGKILL
    rundir.recover(out)  # what the next run in this folder does first
    now = {n_: (out / n_).read_bytes() for n_ in rundir.FINAL_OUTPUTS if (out / n_).is_file()}
    if now != old:  # then it must be the whole new run
        assert now.keys() == old.keys()
        assert json.loads(now["dreampeft_adapter.json"])["trained_steps"] == 4
        assert json.loads(now["dreambooth_config.json"])["max_train_steps"] == 4
        assert "4 steps" in now["README.md"].decode()
    assert (now == old) == (expected == "old")


# -- 8. methods come from the registry only ----------------------------------------------------------
def test_a_newly_registered_method_is_offered_everywhere(tiny_sdxl, instance_dir, tmp_path):
    from dataclasses import dataclass

    from dreampeft.adapters import METHODS, LoRAConfig, LoRALayer, register_method
    from dreampeft.app.forms import option_specs
    from dreampeft.dreambooth import DreamBoothConfig, build_parser
    from dreampeft.presets import method_preset, parse_methods

    @dataclass
    class EchoConfig(LoRAConfig):
        method = "echo_lora"

    @register_method
    class EchoLayer(LoRALayer):
        config_cls = EchoConfig
        default_lr = 3e-4

    try:
        assert "echo_lora" in build_parser()._option_string_actions["--adapter"].choices
        assert parse_methods("lora,echo_lora") == ["lora", "echo_lora"]
        assert method_preset("toy", "echo_lora").lr == method_preset("sdxl", "echo_lora").lr == 3e-4
        assert {s.method for s in option_specs()} >= {"echo_lora"}
        cfg = DreamBoothConfig(pretrained_model_name_or_path=str(tiny_sdxl), instance_data_dir=str(instance_dir),
                               instance_prompt="a sks toy", adapter="echo_lora", extra_exports=["peft"])
        assert isinstance(cfg.adapter_config(), EchoConfig)  # and PEFT export is allowed: LoRA's writer
    finally:
        METHODS.pop("echo_lora")
    with pytest.raises(dp.ConfigError, match="--methods: unknown \\['echo_lora'\\]; choose from lora, lora_dash"):
        parse_methods("echo_lora")


def test_fourierft_inference_cache_follows_a_fused_optimizer_step():
    """Fused AdamW (transformers' default) updates parameters without bumping their version
    counter; FourierFT's no-grad weight cache must still see the new spectrum."""
    from dreampeft.adapters import reference_forward

    layer = dp.get_method("fourierft")(torch.nn.Linear(16, 12), dp.FourierFTConfig(n_frequency=20, scaling=5.0))
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x)  # fills the cache
    opt = torch.optim.AdamW([layer.spectrum], lr=0.1, fused=True)
    layer(x).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_forward(layer, x))


def test_a_full_disk_at_the_final_save_is_one_line_and_keeps_the_checkpoint(tiny_sdxl, instance_dir, tmp_path,
                                                                             capsys, monkeypatch):
    import errno

    from dreampeft.dreambooth import finish

    def full(models, out, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "pytorch_lora_weights.safetensors"))

    monkeypatch.setattr(finish, "export_diffusers", full)
    out = tmp_path / "out"
    code, err = _main(base_args(tiny_sdxl, instance_dir, out, "--checkpointing_steps", "2"), capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0]
    assert str(out / "checkpoint-2") in lines[0] and "--resume_from_checkpoint latest" in lines[0]
    assert read_events(out / "events.jsonl")[-1]["event"] == "error"
    assert not (out / "dreampeft_adapter.safetensors").exists()  # nothing half-committed
    monkeypatch.undo()
    assert _main(base_args(tiny_sdxl, instance_dir, out, "--checkpointing_steps", "2",
                           "--resume_from_checkpoint", "latest"), capsys)[0] == 0
    assert (out / "dreampeft_adapter.safetensors").exists() and not (out / ".final.tmp").exists()


# -- the hostile sweep: options out of range and unreadable inputs, per entry point -----------------
@pytest.mark.parametrize("flags,match", [
    (["--validation_steps", "-1"], "--validation_steps must be >= 0"),
    (["--checkpointing_steps", "-5"], "--checkpointing_steps must be >= 0"),
    (["--text_encoder_lr", "-1"], "--text_encoder_lr must be > 0"),
    (["--inference_steps", "0"], "--inference_steps must be >= 1"),  # was a ZeroDivisionError
    (["--snr_gamma", "0"], "--snr_gamma must be > 0"),  # was silently no learning
    (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0"),
    (["--resolution", "100000"], "--resolution 100000 is above 4096"),  # was the kernel's OOM killer
    (["--with_prior_preservation", "--class_prompt", "a toy", "--class_data_dir", "CLS", "--num_class_images", "0"],
     "--num_class_images must be >= 1"),
    (["BINARY_CAPTION"], r"img0.txt: cannot read this caption \(UnicodeDecodeError\)"),
    (["--output_dir", "FILE"], "--output_dir .*FILE is a file; give a folder"),
    (["--dash_svd_cache", "CLS"], r"--dash_svd_cache applies to --adapter lora_dash \(got lora\)"),
    (["--adapter", "lora_dash", "--dash_svd_cache", "FILE"], "--dash_svd_cache .*FILE: that is a file; give a folder"),
])
def test_trainer_options_out_of_range_are_one_line(flags, match, tiny_sdxl, instance_dir, tmp_path, capsys):
    import re

    (tmp_path / "FILE").write_text("x")
    if flags == ["BINARY_CAPTION"]:
        (instance_dir / "img0.txt").write_bytes(b"\xff\xfe\x00bad")
        flags = []
    flags = [str(tmp_path / f) if f in ("FILE", "CLS") else f for f in flags]
    code, err = _main(base_args(tiny_sdxl, instance_dir, tmp_path / "out", *flags), capsys)
    assert code == 2 and re.search(match, err), err


@pytest.mark.parametrize("entry,argv,match", [
    ("export", ["RUN", "--to", "diffusers", "--base", "NOPE", "--out", "X"], "--base .*nope: cannot load it"),
    ("eval", ["--real", "DATA", "--generated", "DATA", "--prompts", "TMP"], "--prompts .*: cannot read it"),
    ("llm", ["--model", "NOPE", "--data", "DATA"], "--model .*nope: cannot load it"),
    ("compare", ["--instance_data_dir", "DATA", "--instance_prompt", "p", "--prompts", "x",
                 "--learning_rates", "lora=abc"], "--learning_rates 'lora=abc': write method=rate pairs"),
])
def test_other_entry_points_give_one_line(entry, argv, match, tiny_sdxl, instance_dir, tmp_path, capsys):
    import importlib
    import re

    main = importlib.import_module({"export": "dreampeft.export", "eval": "dreampeft.eval.__main__",
                                    "llm": "dreampeft.tasks.llm", "compare": "dreampeft.compare"}[entry]).main
    subs = {"RUN": str(_saved(tiny_sdxl, tmp_path, "lora")), "NOPE": str(tmp_path / "nope"), "X": str(tmp_path / "x"),
            "DATA": str(instance_dir), "TMP": str(tmp_path)}
    try:
        code = main([subs.get(a, a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and re.search(match, err) and "Traceback" not in err, err


def test_the_apps_handlers_refuse_what_an_api_call_can_send(tiny_sdxl, tmp_path):
    from types import SimpleNamespace

    from dreampeft.app import App
    from dreampeft.presets import learning_rates

    from .test_app import SUBJECT

    queue = SimpleNamespace(jobs=[], submit=lambda cfg: pytest.fail("nothing may be queued"))
    app = App(tmp_path / "work", model=str(tiny_sdxl), queue=queue)
    values, lrs = [s.default for s in app.specs], list(learning_rates("sdxl").values())
    train = {"blank rate": ((["lora"], 2, 64), [None, *lrs[1:]], "fill in the learning rate of lora"),
             "unknown method": ((["vera"], 2, 64), lrs, "Methods: unknown \\['vera'\\]"),
             "huge resolution": ((["lora"], 2, 100000), lrs, "--resolution 100000 is above 4096")}
    for (methods, steps, res), rates, match in train.values():
        message = app.train(str(tiny_sdxl), SUBJECT, "a sks toy", "toy", methods, steps, res, 0, 0, *rates, *values)
        assert message.startswith("**Cannot start:**") and __import__("re").search(match, message), message
    generate = {(0, 2, 64, 1.0): "images per model must be between 1 and 8", (1, 0, 64, 1.0): "denoising steps",
                (1, 2, 100000, 1.0): "resolution must be between 8 and 4096", (1, 2, 64, 9.0): "adapter scale",
                (1, 2, None, 1.0): "fill in every number"}
    for (n, steps, res, scale), match in generate.items():
        gallery, scores, message = app.generate(str(tiny_sdxl), "a sks toy", 0, n, steps, res, scale)
        assert gallery == [] and message.startswith("**Cannot generate:**") and match in message, message
