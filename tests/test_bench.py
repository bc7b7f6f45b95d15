"""The benchmark scripts run (their figures are in bench/results; here only that they work)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_runs_every_method_on_the_cpu_path(tiny_sdxl, tmp_path):
    """bench/gpu_sdxl.py's CPU path on the tiny SDXL: one row per run (LoRA again last: the noise), bf16
    base, the peak."""
    out = tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, "bench/gpu_sdxl.py", "--model", str(tiny_sdxl), "--resolution", "64",
                           "--steps", "1", "--methods", "lora,fourierft,mora,lora", "--rounds", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = out.read_text()
    assert "bf16 base, fp32 adapters" in table and "peak: the process's max RSS" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0] for r in rows] == ["| lora", "| fourierft", "| mora", "| lora (again)"]
    assert all(float(r.split(" | ")[2].split()[0]) > 0 for r in rows)  # s/step measured
    turns = [r.split(" | ")[5] for r in rows]  # the methods taking turns in one process, over LoRA
    assert turns[0] == turns[3] == "1.00" and all(float(t) > 0 for t in turns)


def test_dash_launch_bench_reads_its_cache_and_selects_the_same_directions(tiny_sdxl, tmp_path):
    """bench/dash_launch.py on the tiny UNet: three launches (no cache, cold, warm), same directions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dash_launch", ROOT / "bench" / "dash_launch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "dash.md"
    assert bench.main(["--model", str(tiny_sdxl), "--out", str(out), "--cache", str(tmp_path / "svd")]) == 0
    table = out.read_text()
    assert "bit-identical in all three: True" in table and "| cache, next run (read) |" in table
    assert len(list((tmp_path / "svd").glob("*.safetensors"))) > 0


def test_dash_prefetch_bench_runs_the_trainer_both_ways_to_the_same_adapter(tiny_sdxl, tmp_path):
    """bench/dash_prefetch.py on the tiny SDXL: the real CLI with the SVDs taken at the launch and
    prefetched in a background thread (into a cache folder); both end with the same adapter."""
    out = tmp_path / "prefetch.md"
    proc = subprocess.run([sys.executable, "bench/dash_prefetch.py", "--model", str(tiny_sdxl), "--warmup", "3",
                           "--resolution", "64", "--where", "disk", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = out.read_text()
    assert "Same adapter bit for bit: True" in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "launch s" not in line]
    assert [r[0] for r in rows] == ["| at the launch (`--no-dash_svd_prefetch`)", "| prefetched during the warm-up (disk)"]
    done, total = rows[1][2].split(" / ")
    assert rows[0][2].startswith("0 / ") and 0 <= int(done) <= int(total)  # the thread only works when asked to


def test_toy_ceiling_trains_only_the_parameters_asked_for(tmp_path, capsys):
    """bench/toy_ceiling.py (full fine-tuning, the bound no adapter passes): with --params attentions
    the resnets do not move and the attention weights do; the CLI prints one judged row per step
    (subject, prompt and drift columns); each kind of class caption names what it says."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("toy_ceiling", ROOT / "bench" / "toy_ceiling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pipe, _ = bench._load(bench.TOY_MODEL)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    step, own, (prompts, drawn) = next(bench.fine_tune(pipe, "star", [1], "attentions", images=1, log=lambda m: None))
    moved = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert step == 1 and len(own) == 2 and len(drawn) == len(prompts) == 5  # images=1: one per recontext prompt
    assert moved and all(".attentions." in n for n in moved)
    assert any(n.endswith("ff.net.2.weight") for n in moved)  # the whole transformer block trains
    with_prior, _ = bench._load(bench.TOY_MODEL)  # the same first step plus class images in the loss
    next(bench.fine_tune(with_prior, "star", [1], "attentions", prior=2, class_dir=tmp_path / "class", images=1,
                         class_images=4, log=print))
    alone, prior = dict(pipe.unet.named_parameters()), dict(with_prior.unet.named_parameters())
    assert all(torch.equal(prior[n], before[n]) for n in before if n not in moved)
    assert any(not torch.equal(prior[n], alone[n]) for n in moved)
    with pytest.raises(SystemExit):  # refused before anything loads
        bench.main(["--class_images", "0"])
    assert "--class_images must be at least 1 (got 0)" in capsys.readouterr().err
    grid = tmp_path / "grid.png"
    proc = subprocess.run([sys.executable, "bench/toy_ceiling.py", "--steps", "1,2", "--grid", str(grid),
                           "--prior", "2", "--class_captions", "object", "--class_dir", str(tmp_path / "class_object"),
                           "--images", "1", "--class_images", "4", "--drift_captions", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [r for r in proc.stdout.splitlines() if r.startswith("| | ")]
    assert [r.split(" | ")[1] for r in rows] == ["1", "2"] and grid.exists()
    cells = [r.strip(" |").split(" | ")[1:] for r in rows]  # instance, recontext, prompt, drift
    assert all(len(c) == 4 and all(0 <= float(v) <= 1 for v in c) for c in cells)
    assert 4 * float(cells[0][3]) == round(4 * float(cells[0][3]))  # drift: a share of --drift_captions 4
    from dreampeft.toyworld import SHAPES, asked  # --prior draws --class_images captioned class images once

    for folder, named in (("class", {"size", "position", "background"}), ("class_object", set())):
        captions = [f.read_text() for f in sorted((tmp_path / folder).glob("class-*.txt"))]
        assert len(captions) == 4 and all(named <= asked(c).keys() for c in captions)
    assert all(c.startswith(("a object", "a small object", "a large object")) and not any(s in c for s in SHAPES)
               for c in captions)  # DreamBooth's class prompt: the instance prompt less "sks"
    plain = bench.write_class_images(pipe, tmp_path / "class_plain", n=3, **bench.CLASS_CAPTIONS["plain"])
    assert [f.read_text() for f in sorted(plain.glob("class-*.txt"))] == ["a object\n"] * 3  # nothing else named
    shapes = bench.write_class_images(pipe, tmp_path / "class_shapes", n=3, **bench.CLASS_CAPTIONS["shapes"])
    from dreampeft.toyworld import OBJECT_COLOURS

    named = [f.read_text().split() for f in sorted(shapes.glob("class-*.txt"))]  # "a red circle": the words
    assert all(len(w) == 3 and w[1] in OBJECT_COLOURS and w[2] in SHAPES for w in named)  # drift measures, only


def test_toy_noisy_loss_splits_the_error_into_layout_and_detail():
    """bench/toy_noisy_loss.py on the shipped toy: one row per timestep, SNR falling to 0; block
    means never hold more than the whole (mean square), so each pooled share lies in [0, 1], and the
    object's detail is a part of the rest; and the CLI prints the table."""
    proc = subprocess.run([sys.executable, "bench/toy_noisy_loss.py", "--n", "8", "--pool", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.strip(" |").split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "snr" not in line]
    from importlib import util

    spec = util.spec_from_file_location("toy_noisy_loss", ROOT / "bench" / "toy_noisy_loss.py")
    bench = util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert [int(r[0]) for r in rows] == list(bench.TIMESTEPS)
    snr = [float(r[1]) for r in rows]
    assert snr == sorted(snr, reverse=True) and snr[-1] == 0
    for r in rows:
        target, target_pooled, err, err_pooled, share, on_object = map(float, r[2:])
        assert 0.8 < target < 1.2 and 0 < target_pooled < target and 0 < err_pooled < err and 0 < share < 1
        assert 0 < on_object < 1 - share + 0.01
