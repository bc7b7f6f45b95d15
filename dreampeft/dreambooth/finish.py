"""The end of a run: the final save (atomic as a whole, see ``rundir``) and the typed result."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import inject
from ..export import DIFFUSERS_WEIGHTS, export_diffusers, export_kohya, export_merged, export_peft, factorize
from ..state import WEIGHTS_NAME, save_adapter
from . import rundir
from .card import write_model_card
from .metadata import add_metadata, kohya_metadata


@dataclass
class TrainResult:
    """What ``train()`` returns: where everything is, and what the run cost."""

    output_dir: Path
    adapter: Path  # the native file (exact for every method)
    diffusers: Path  # pytorch_lora_weights.safetensors for load_lora_weights
    method: str
    steps: int
    trainable: int
    images: list[str] = field(default_factory=list)  # final validation images
    step_seconds: list[float] = field(default_factory=list)  # per optimizer step, this session
    peak_memory_mb: float = 0.0  # CUDA peak, or the process's max RSS on CPU
    export_rel_error: dict = field(default_factory=dict)  # component → relative error of the LoRA export
    rank_checksums: list = field(default_factory=list)

    @property
    def train_seconds(self) -> float:
        return sum(self.step_seconds)


def peak_memory_mb(device) -> float:
    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def final_save(run, images: list[str]) -> dict:
    """Write every final file into the stage, then commit them into the output folder together;
    returns the export report. With --use_ema every file holds the averaged weights, and
    ``training_weights/`` the weights the optimizer left."""
    cfg, models, out = run.cfg, run.unwrapped(), Path(run.cfg.output_dir)
    staged = rundir.stage(out)
    meta = {"base_model": cfg.pretrained_model_name_or_path, "instance_prompt": cfg.instance_prompt,
            "trained_steps": run.total_steps,
            **({"single_file_config": cfg.single_file_config} if cfg.single_file_config else {})}
    if run.ema is None:
        return _write_final(run, models, staged, meta, images)
    save_adapter(models, staged / "training_weights", extra_metadata={**meta, "weights": "training"})
    with run.ema.swapped(models):
        return _write_final(run, models, staged, {**meta, "weights": f"ema {cfg.ema_decay}"}, images)


def _write_final(run, models: dict, staged: Path, meta: dict, images: list[str]) -> dict:
    cfg, out = run.cfg, Path(run.cfg.output_dir)
    save_adapter(models, staged, extra_metadata=meta)
    cfg.save(staged / "dreambooth_config.json")
    factors = factorize(models, rank=cfg.export_rank, energy=cfg.export_energy)
    report = export_diffusers(models, staged, rank=cfg.export_rank, energy=cfg.export_energy, factors=factors)
    (staged / "export_report.json").write_text(json.dumps(report, indent=1) + "\n")
    if "kohya" in cfg.extra_exports:
        kohya = export_kohya(models, staged, rank=cfg.export_rank, energy=cfg.export_energy, factors=factors)
        add_metadata(kohya, kohya_metadata(run))
    if "peft" in cfg.extra_exports:
        export_peft(models, staged / "peft", base_model=cfg.pretrained_model_name_or_path)
    if "merged" in cfg.extra_exports:
        export_merged(cfg.pretrained_model_name_or_path, staged, staged / "merged")
    trainable = sum(inject.trainable_parameter_count(m) for m in models.values())
    write_model_card(staged, cfg, trainable, run.total_steps, report, images, run_dir=out, buckets=run.buckets)
    rundir.commit(out)
    return report


def make_result(run, images: list[str], report: dict, step_seconds: list[float], checksums: list) -> TrainResult:
    out = Path(run.cfg.output_dir)
    return TrainResult(
        output_dir=out, adapter=out / WEIGHTS_NAME, diffusers=out / DIFFUSERS_WEIGHTS, method=run.cfg.adapter,
        steps=run.total_steps, images=images, step_seconds=step_seconds, peak_memory_mb=peak_memory_mb(run.device),
        trainable=sum(inject.trainable_parameter_count(m) for m in run.unwrapped().values()),
        export_rel_error={c: r["overall_rel_error"] for c, r in report["components"].items()},
        rank_checksums=checksums)


def rank_checksums(run) -> list[list[float]]:
    """(sum, sum of squares) of every adapter tensor, from every process: replicas must agree."""
    vals = [(p.detach().double().sum(), p.detach().double().pow(2).sum())
            for m in run.unwrapped().values() for p in inject.adapter_parameters(m)]
    local = torch.tensor([sum(v[0] for v in vals), sum(v[1] for v in vals)], dtype=torch.float64)
    gathered = run.acc.gather(local.to(run.device)[None]).cpu().tolist()
    if any(row != gathered[0] for row in gathered):
        raise RuntimeError(f"adapter replicas diverged across processes: {gathered}")
    return gathered
