"""Forward+backward cost of each adapter on SDXL-sized layers, against the frozen layer and peft.

    python bench/adapters.py [--reps 15] [--device cpu|cuda] [--out bench/results/adapters_cpu.md]

Every case runs interleaved (one repetition of each variant, then the next round), so drift of
the machine hits all variants alike; times are medians. Memory is the peak CUDA allocation on
GPU; on CPU it is the bytes autograd saves for backward (deduplicated by storage), the part
that grows with tokens. The input needs its gradient too, as inside a network.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dreampeft as dp  # noqa: E402

# (d_in, d_out, tokens): SDXL at 1024 px, batch 1. Self-attention at the 640- and 1280-channel
# levels (64² and 32² latent positions) and cross-attention k/v over 77 text tokens.
SHAPES = [(640, 640, 4096), (1280, 1280, 1024), (2048, 640, 77), (2048, 1280, 77)]
TARGETS = {"ours lora ≤ 1.0× peft lora": ("lora r8", "peft lora r8", 1.0),
           "ours fourierft ≤ 0.75× peft fourierft": ("fourierft n1000", "peft fourierft n1000", 0.75),
           "mora t6 r8 ≤ 1.25× ours lora r8": ("mora t6 r8", "lora r8", 1.25),
           "lora_dash ≤ 1.05× ours lora r8": ("lora_dash r8 s8", "lora r8", 1.05)}


def variants(d_in: int, d_out: int, device: str):
    import peft

    def ours(cfg, launch=False):
        def make():
            m = nn.Sequential(nn.Linear(d_in, d_out)).to(device)
            dp.inject_adapters(m, cfg.replace(target_modules=["0"]))
            with torch.no_grad():
                for p in dp.adapter_parameters(m):
                    p.normal_(0, 0.02)
            if launch:
                dp.launch_dash(m)
            return m
        return make

    def theirs(cfg):
        def make():
            m = nn.Sequential(nn.Linear(d_in, d_out)).to(device)
            return peft.inject_adapter_in_model(cfg, m).to(device)
        return make

    def frozen():
        return nn.Sequential(nn.Linear(d_in, d_out)).to(device).requires_grad_(False)

    return {
        "frozen": frozen,
        "lora r8": ours(dp.LoRAConfig(r=8)),
        "peft lora r8": theirs(peft.LoraConfig(r=8, lora_alpha=8, target_modules=["0"])),
        "lora_dash r8 s8": ours(dp.LoRADashConfig(r=8, n_directions=8), launch=True),
        "fourierft n1000": ours(dp.FourierFTConfig(n_frequency=1000)),
        "peft fourierft n1000": theirs(peft.FourierFTConfig(n_frequency=1000, scaling=150.0,
                                                            target_modules=["0"])),
        "mora t6 r8": ours(dp.MoRAConfig(r=8, mora_type=6)),
        "mora t1 r8": ours(dp.MoRAConfig(r=8, mora_type=1)),
    }


def step(model, x, grad_out):
    out = model(x)
    out.backward(grad_out)
    x.grad = None
    for p in model.parameters():
        p.grad = None


def saved_bytes(model, x, grad_out) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.backward(grad_out)
    return sum(seen.values())


def measure(shape, device: str, reps: int) -> dict[str, tuple[float, float]]:
    d_in, d_out, tokens = shape
    made = {name: make() for name, make in variants(d_in, d_out, device).items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, d_in, generator=g).to(device).requires_grad_()
    grad_out = torch.randn(1, tokens, d_out, generator=g).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {name: [] for name in made}
    for name, model in made.items():  # warm-up
        step(model, x, grad_out)
    for _ in range(reps):
        for name, model in made.items():
            sync()
            t0 = time.perf_counter()
            step(model, x, grad_out)
            sync()
            times[name].append(time.perf_counter() - t0)
    memory = {}
    for name, model in made.items():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(model, x, grad_out)
            memory[name] = torch.cuda.max_memory_allocated() - base
        else:
            memory[name] = saved_bytes(model, x, grad_out)
    return {n: (statistics.median(t), memory[n]) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or f"bench/results/adapters_{args.device}.md")
    lines = [f"# Adapter forward+backward, {args.device}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, median of {args.reps} interleaved reps", ""]
    all_results = {}
    for shape in SHAPES:
        res = measure(shape, args.device, args.reps)
        all_results[shape] = res
        frozen = res["frozen"][0]
        lines += [f"## {shape[0]}→{shape[1]}, {shape[2]} tokens", "",
                  "| variant | ms | × frozen | memory MiB |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {t * 1e3:.2f} | {t / frozen:.2f} | {m / 2**20:.1f} |" for n, (t, m) in res.items()]
        lines.append("")
        print("\n".join(lines[-len(res) - 4:]), flush=True)
    lines += ["## Targets (ratio of medians per shape)", "", "| target | " +
              " | ".join(f"{s[0]}→{s[1]}×{s[2]}" for s in SHAPES) + " |",
              "|---|" + "---:|" * len(SHAPES)]
    for label, (a, b, limit) in TARGETS.items():
        cells = []
        for shape in SHAPES:
            ratio = all_results[shape][a][0] / all_results[shape][b][0]
            cells.append(f"{ratio:.2f}{'' if ratio <= limit else ' ✗'}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(TARGETS) - 4:]))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
