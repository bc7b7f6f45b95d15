"""Every method at the true SDXL size: the trainer's own step, memory, sizes and end-of-run exports.

    python -m dreampeft.tiny sdxl /tmp/sdxl-full --size full      # once: random weights, 2 min, 6.3 GB
    python bench/sdxl_scale.py --model /tmp/sdxl-full [--resolution 256] [--steps 4]
                               [--methods lora,lora_dash,fourierft,mora,dora,peft_lora]

Each method runs in its own process (peak memory is its own): ``setup`` and ``train_step`` of the
real trainer, batch 1, fp32, gradient checkpointing, frozen text encoders, one warm-up step, then
``--steps`` timed steps (median and max). LoRA-Dash launches after half of them; its launch is
timed apart and its steps reported before and after. ``peft_lora`` is the library baseline: the
same run with dreampeft's LoRA swapped for peft's (same rank, alpha, targets, optimizer). Then the
end-of-run exports the trainer writes are timed (the rank-32 diffusers file with its kept energy,
the native file, and the exact kohya ``.diff`` file for methods whose LoRA export is lossy), and a
layer of the 1280-channel level (the UNet's bulk) is timed against LoRA at this resolution's token
count, so a method whose whole step diverges from its layer cost shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
METHODS = {"lora": {"r": 4}, "lora_dash": {"r": 4, "n_directions": 8},
           "fourierft": {"n_frequency": 1000, "scaling": 150.0, "init": "zeros"},
           "mora": {"r": 4, "mora_type": 6}, "dora": {"r": 4}, "peft_lora": {"r": 4}}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _inject(model, method: str, targets: list[str]):
    """``method``'s adapters (METHODS' options) on ``targets``; ``peft_lora`` is peft's LoRA, alpha = r."""
    import dreampeft as dp
    from dreampeft.adapters import get_method

    if method == "peft_lora":
        import peft

        r = METHODS["peft_lora"]["r"]
        return peft.inject_adapter_in_model(peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets), model)
    dp.inject_adapters(model, get_method(method).config_cls(**METHODS[method], target_modules=targets))
    return model


def _use_peft(run) -> None:
    """Swap dreampeft's LoRA for peft's in the run (same r, alpha = r, targets, AdamW settings)."""
    from dreampeft import inject

    unet = run.acc.unwrap_model(run.trained["unet"])
    inject.remove_adapters(unet, merge=False)
    _inject(unet, "peft_lora", run.cfg.adapter_config("unet").target_modules)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    run.optimizer = torch.optim.AdamW(params, lr=run.cfg.learning_rate)
    run.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: 1.0)


def _layer_ratio(method: str, tokens: int, reps: int = 9) -> float:
    """Forward+backward of one 1280² layer with ``method`` over LoRA r4, interleaved, medians."""
    from torch import nn

    def make(name):
        return _inject(nn.Sequential(nn.Linear(1280, 1280)), name, ["0"])

    layers, times = {"lora": make("lora"), method: make(method)}, {"lora": [], method: []}
    x = torch.randn(tokens, 1280)
    for _ in range(reps):
        for name, m in layers.items():
            xi = x.clone().requires_grad_()
            t0 = time.perf_counter()
            m(xi).sum().backward()
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times[method]) / statistics.median(times["lora"])


def _swap_in(unet, method: str) -> None:
    """Take whichever adapters ``unet`` holds out, then put ``method``'s in (on SDXL's attention)."""
    import peft

    import dreampeft as dp

    dp.remove_adapters(unet, merge=False)
    unet.requires_grad_(False)
    for name, m in list(unet.named_modules()):
        if isinstance(m, peft.tuners.lora.LoraLayer):
            unet.set_submodule(name, m.get_base_layer())
    _inject(unet, method, list(dp.UNET_ATTENTION))
    with torch.no_grad():  # every adapter away from its zero start, as after a few steps
        for p in (p for p in unet.parameters() if p.requires_grad):
            p.add_(torch.randn_like(p), alpha=1e-3)
    unet.train()


def interleaved(model: str, methods: list[str], res: int, rounds: int, steps: int = 2) -> dict[str, float]:
    """The UNet's forward + backward (gradient checkpointing, batch 1) with each method in turn, in one
    process, ``rounds`` times over: median seconds per method. Separate processes drift by ±10 % on
    this CPU (LoRA run first and again last: 6.7 and 7.2 s); taking turns in one process cancels it."""
    from diffusers import UNet2DConditionModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").float().to(device)
    unet.enable_gradient_checkpointing()
    c, gen = unet.config, torch.Generator().manual_seed(0)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    latents = torch.randn(1, 4, res // 8, res // 8, generator=gen).to(device)
    text = torch.randn(1, 77, c.cross_attention_dim, generator=gen).to(device)
    added = {"text_embeds": torch.randn(1, pooled, generator=gen).to(device),
             "time_ids": torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=device)}
    t = torch.tensor([500], device=device)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for method in methods:
            _swap_in(unet, method)
            for i in range(steps + 1):  # the first is untimed (allocator warm-up after the swap)
                t0 = time.perf_counter()
                unet(latents, t, text, added_cond_kwargs=added).sample.pow(2).mean().backward()
                unet.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[method] += [time.perf_counter() - t0] if i else []
    return {m: statistics.median(t) for m, t in times.items()}


def child(model: str, method: str, steps: int, res: int, workdir: Path, precision: str = "no",
          optimizer: str = "adamw", exports: bool = True) -> dict:
    from dreampeft.adapters import launch_dash
    from dreampeft.dreambooth import DreamBoothConfig
    from dreampeft.dreambooth.finish import peak_memory_mb
    from dreampeft.dreambooth.train import make_accelerator, setup, train_step
    from dreampeft.export import export_diffusers, factorize
    from dreampeft.export_kohya import export_kohya_diff
    from dreampeft.state import save_adapter
    from dreampeft.tiny import ASSETS
    from dreampeft.utils import quiet_libraries

    quiet_libraries()
    cfg = DreamBoothConfig(pretrained_model_name_or_path=model, instance_data_dir=str(ASSETS / "subject"),
                           instance_prompt="a photo of sks toy", output_dir=str(workdir / method),
                           adapter="lora" if method == "peft_lora" else method, adapter_options=METHODS[method],
                           resolution=res, center_crop=True, gradient_checkpointing=True,
                           max_train_steps=steps + 1, mixed_precision=precision, optimizer=optimizer)
    (run, load_s) = _timed(lambda: setup(cfg, make_accelerator(cfg)))
    if method == "peft_lora":
        _use_peft(run)
    unet = run.acc.unwrap_model(run.trained["unet"])
    times, launch_s = [], None
    for step in range(steps + 1):
        if method == "lora_dash" and step == 1 + steps // 2:
            launch_s = _timed(lambda: launch_dash(unet))[1]
        times.append(_timed(lambda: train_step(run, step))[1])
    frozen = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    result = {"unet_params": frozen, "load_s": load_s, "step_s": statistics.median(times[1:]), "max_s": max(times[1:]),
              "peak_mib": peak_memory_mb(run.device), "trainable": sum(p.numel() for p in unet.parameters() if p.requires_grad)}
    if method == "lora_dash":
        half = 1 + steps // 2
        result.update(before_s=statistics.median(times[1:half]), after_s=statistics.median(times[half:]),
                      launch_s=launch_s)
    if exports and method != "peft_lora":
        models = {"unet": unet}
        native = save_adapter(models, workdir / f"{method}-native")
        (factors, svd_s) = _timed(lambda: factorize(models, rank=32))
        (report, write_s) = _timed(lambda: export_diffusers(models, workdir / f"{method}-d", rank=32, factors=factors))
        err = report["components"]["unet"]["overall_rel_error"]
        result.update(native_mb=native.stat().st_size / 1e6, export_s=svd_s + write_s, energy_kept=1 - err ** 2,
                      diffusers_mb=(workdir / f"{method}-d" / "pytorch_lora_weights.safetensors").stat().st_size / 1e6)
        if err > 1e-4:  # lossy: the exact A1111/ComfyUI alternative
            (path, diff_s) = _timed(lambda: export_kohya_diff(models, workdir))
            result.update(diff_s=diff_s, diff_mb=path.stat().st_size / 1e6)
    tokens = (res // 8 // 4) ** 2  # the 1280-channel level: latents / 4
    result["layer_ratio"] = _layer_ratio(method, tokens)
    return result


def _row(method: str, r: dict, lora: dict, turns: dict) -> str:
    def f(key, fmt="{:.1f}"):
        return fmt.format(r[key]) if r.get(key) is not None else "–"

    name = method.split()[0]  # "lora (again)" took its turns as lora
    turn = f"{turns[name] / turns['lora']:.2f}" if name in turns and "lora" in turns else "–"

    dash = f" (before {r['before_s']:.1f}, after {r['after_s']:.1f}; launch {r['launch_s']:.0f} s)" if "launch_s" in r else ""
    return (f"| {method} | {r['trainable']:,} | {r['step_s']:.1f}{dash} | {r['max_s']:.1f} | "
            f"{r['step_s'] / lora['step_s']:.2f} | {turn} | {r['layer_ratio']:.2f} | {r['peak_mib'] / 1024:.1f} | "
            f"{f('native_mb')} | {f('export_s')} | {f('energy_kept', '{:.3f}')} | {f('diff_s')} | {f('diff_mb', '{:.0f}')} |")


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a full-size SDXL folder (python -m dreampeft.tiny sdxl "
                        "DIR --size full)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--methods", default=",".join([*METHODS, "lora"]),
                        help="run in this order; a method named twice runs twice (LoRA last again: the drift "
                        "between its two runs is the noise the ratios carry)")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--no_exports", action="store_true", help="steps and memory only")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the methods taking turns in one process "
                        "(the UNet's forward + backward; the ratio that process drift does not blur); 0: skip")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "DIR"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None, name: str = "sdxl_scale") -> dict:
    """Runs every method in its own process; returns {"results": per method, "out": the table}."""
    parser = arguments()
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not args.child and args.steps < 2 and "lora_dash" in args.methods.split(","):
        parser.error(f"--steps must be at least 2 with lora_dash, timed before and after its launch (got {args.steps})")
    if args.child and args.child[0] == "turns":
        print(json.dumps(interleaved(args.model, args.methods.split(","), args.resolution, args.rounds)))
        return {}
    if args.child:
        print(json.dumps(child(args.model, args.child[0], args.steps, args.resolution, Path(args.child[1]),
                               args.mixed_precision, args.optimizer, not args.no_exports)))
        return {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out or f"bench/results/{name}_{device}.md")
    weights = {"no": "fp32", "bf16": "bf16 base, fp32 adapters", "fp16": "fp16 base, fp32 adapters"}[args.mixed_precision]
    lines = ["| method | trainable | s/step | slowest | × lora step | × lora, taking turns | "
             "× lora layer (1280²) | peak GiB | native MB | export s (rank 32) | energy kept | exact .diff s | .diff MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    results, methods = {}, args.methods.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        def run(method: str, *extra: str) -> dict:
            cmd = [sys.executable, __file__, "--model", args.model, "--resolution", str(args.resolution),
                   "--steps", str(args.steps), "--mixed_precision", args.mixed_precision, "--optimizer",
                   args.optimizer, *extra, "--child", method, tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.exit(f"{method}: {proc.stderr[-3000:]}")
            return json.loads(proc.stdout.strip().splitlines()[-1])

        for method in methods:
            key = method if method not in results else f"{method} (again)"
            results[key] = run(method, *(["--no_exports"] if args.no_exports else []))
            print(key, json.dumps(results[key]), flush=True)
        distinct = list(dict.fromkeys(methods))
        turns = run("turns", "--rounds", str(args.rounds), "--methods", ",".join(distinct)) if args.rounds else {}
        print("taking turns", json.dumps(turns), flush=True)
    lora = results.get("lora") or next(iter(results.values()))
    lines += [_row(m, r, lora, turns) for m, r in results.items()]
    peak = "torch.cuda.max_memory_allocated" if device == "cuda" else "the process's max RSS"
    lines = [f"# SDXL-architecture UNet of {lora['unet_params'] / 1e9:.3f} B parameters (random weights), {device}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads: {args.resolution} px, batch 1, {weights}, "
             f"{args.optimizer}, gradient checkpointing, median of {args.steps} steps; peak: {peak}", "",
             f"Taking turns: the UNet's forward + backward (fp32, batch 1, gradient checkpointing), every method in "
             f"turn in one process, {args.rounds} rounds of 2 timed calls each (median).", "", *lines]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\nwritten to {out}")
    return {"results": results, "out": out}


if __name__ == "__main__":
    main()
