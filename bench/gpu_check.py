"""Correctness of every method on a CUDA device: forward == base + x ΔWᵀ (fp32 and bf16 base,
autocast), gradients reach the adapters, LoRA-Dash launches on the device, merge is exact.

    python bench/gpu_check.py        # exits non-zero on the first mismatch
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dreampeft as dp  # noqa: E402
from dreampeft.adapters import reference_forward  # noqa: E402

CONFIGS = {
    "lora": dp.LoRAConfig(r=8, alpha=16),
    "lora_dash": dp.LoRADashConfig(r=8, n_directions=8),
    "fourierft": dp.FourierFTConfig(n_frequency=1000, scaling=150.0),
    "mora t6": dp.MoRAConfig(r=8, mora_type=6),
    "mora t1": dp.MoRAConfig(r=8, mora_type=1),
}


def check(name, cfg, d_in, d_out, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out)).cuda().to(dtype)
    dp.inject_adapters(model, cfg.replace(target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        for p in dp.adapter_parameters(model):
            p.normal_(0, 0.02)
    dp.launch_dash(model)
    x = torch.randn(4, 77, d_in, device="cuda", dtype=dtype)
    out = model(x)
    ref = reference_forward(layer, x)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    out.float().pow(2).mean().backward()
    grads_ok = all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32
                   for p in dp.adapter_parameters(model))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        auto = model(x.float() if dtype == torch.float32 else x)
    auto_err = ((auto.float() - ref).abs().max() / ref.abs().max()).item()
    with torch.no_grad():
        unmerged = model(x).float()
        dp.merge_adapters(model)
        merge_err = ((model(x).float() - unmerged).abs().max() / unmerged.abs().max()).item()
    ok = err < tol and grads_ok and auto_err < 5e-2 and merge_err < tol
    print(f"{name:<10} {d_out}x{d_in} {str(dtype):<15} fwd rel err {err:.1e}  autocast {auto_err:.1e}  "
          f"merge {merge_err:.1e}  grads {'ok' if grads_ok else 'BAD'}  {'PASS' if ok else 'FAIL'}")
    return ok


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    results = [check(n, c, d_in, d_out, dt) for n, c in CONFIGS.items()
               for d_in, d_out in [(640, 640), (2048, 1280)] for dt in (torch.float32, torch.bfloat16)]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
