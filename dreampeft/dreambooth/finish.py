"""The end of a run: the final save (atomic as a whole, see ``rundir``) and the typed result."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import inject
from ..export import DIFFUSERS_WEIGHTS, export_diffusers, export_peft, factorize, save_merged_copy
from ..export_kohya import export_kohya, export_kohya_diff
from ..state import WEIGHTS_NAME, save_adapter
from . import rundir
from .card import write_model_card
from .ema import swapped
from .fidelity import DRIFT_LIMIT, PLOT_NAME, REASONS
from .plots import fidelity_plot
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
    fidelity: list = field(default_factory=list)  # the --eval_steps rows (fidelity.csv)
    exported_step: int | None = None  # the step whose weights the exports hold (--keep_best)
    exported_reason: str = ""

    def fidelity_summary(self) -> dict:
        """What the ``done`` event says about the evaluations, if there were any."""
        if not self.fidelity:
            return {}
        seconds = sum(r["seconds"] for r in self.fidelity)
        return {"exported_step": self.exported_step, "exported_reason": self.exported_reason,
                "eval_seconds": round(seconds, 2), "evaluations": len(self.fidelity),
                # of the loop's time (steps + evaluations; this session's steps, every evaluation)
                "eval_share": round(seconds / (seconds + self.train_seconds), 4)}

    @property
    def train_seconds(self) -> float:
        return sum(self.step_seconds)


def peak_memory_mb(device) -> float:
    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def exported_weights(run) -> tuple[int, str, object]:
    """(step, why, context manager putting those weights in the layers) of what the exports hold:
    the best evaluation (--keep_best), else the EMA (--use_ema), else the last weights."""
    chosen = run.evaluator.chosen(run.total_steps) if run.evaluator else None
    if chosen is not None:
        why = REASONS[run.cfg.keep_best] + (_why_base(run.evaluator.history.rows) if chosen["step"] == 0 else "")
        return chosen["step"], why, swapped(run.unwrapped(), chosen["tensors"])
    why = REASONS["last"] if run.cfg.keep_best == "last" or not run.evaluator else (
        REASONS[run.cfg.keep_best] + ": the last evaluation")
    if run.ema is not None:
        return run.total_steps, why + f" (EMA {run.cfg.ema_decay})", run.ema.swapped(run.unwrapped())
    return run.total_steps, why, contextlib.nullcontext()


def _why_base(rows: list[dict]) -> str:
    """Why step 0 — the untrained adapter, i.e. the base model — was kept: a user who trained for
    minutes must not read it as "nothing was learnt" without being told."""
    later = [r for r in rows if r["step"] > 0]
    if later and all(r["drift"] > DRIFT_LIMIT for r in later):
        return f": step 0, the base model — every later evaluation drifted past {DRIFT_LIMIT}"
    return ": step 0, the base model — no later evaluation scored higher"


def final_save(run, images: list[str]) -> dict:
    """Write every final file into the stage, then commit them into the output folder together;
    returns the export report. When the exports hold other weights than the optimizer's last (EMA,
    --keep_best), ``training_weights/`` keeps those."""
    cfg, models, out = run.cfg, run.unwrapped(), Path(run.cfg.output_dir)
    staged = rundir.stage(out)
    step, why, weights = exported_weights(run)
    meta = {"base_model": cfg.pretrained_model_name_or_path, "instance_prompt": cfg.instance_prompt,
            "trained_steps": run.total_steps, "exported_step": step,
            **({"single_file_config": cfg.single_file_config} if cfg.single_file_config else {})}
    if run.ema is not None or step != run.total_steps:
        save_adapter(models, staged / "training_weights", extra_metadata={**meta, "weights": "training"})
    if run.evaluator and run.evaluator.history.rows:
        fidelity_plot({cfg.adapter: run.evaluator.history.rows}, staged / PLOT_NAME, {cfg.adapter: step})
    run.exported = (step, why)
    with weights:
        return _write_final(run, models, staged, meta, images)


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
    if "kohya_diff" in cfg.extra_exports:
        add_metadata(export_kohya_diff(models, staged), kohya_metadata(run))
    if "peft" in cfg.extra_exports:
        export_peft(models, staged / "peft", base_model=cfg.pretrained_model_name_or_path)
    if "merged" in cfg.extra_exports:
        save_merged_copy(run.pipeline(), models, staged / "merged")
    trainable = sum(inject.trainable_parameter_count(m) for m in models.values())
    write_model_card(staged, cfg, trainable, run.total_steps, report, images, run_dir=out, buckets=run.buckets,
                     fidelity=run.evaluator.history.rows if run.evaluator else [], exported=run.exported)
    rundir.commit(out)
    return report


def make_result(run, images: list[str], report: dict, step_seconds: list[float], checksums: list) -> TrainResult:
    out = Path(run.cfg.output_dir)
    return TrainResult(
        output_dir=out, adapter=out / WEIGHTS_NAME, diffusers=out / DIFFUSERS_WEIGHTS, method=run.cfg.adapter,
        steps=run.total_steps, images=images, step_seconds=step_seconds, peak_memory_mb=peak_memory_mb(run.device),
        trainable=sum(inject.trainable_parameter_count(m) for m in run.unwrapped().values()),
        export_rel_error={c: r["overall_rel_error"] for c, r in report["components"].items()},
        rank_checksums=checksums, fidelity=list(run.evaluator.history.rows) if run.evaluator else [],
        exported_step=run.exported[0], exported_reason=run.exported[1])


def rank_checksums(run) -> list[list[float]]:
    """(sum, sum of squares) of every adapter tensor, from every process: replicas must agree."""
    vals = [(p.detach().double().sum(), p.detach().double().pow(2).sum())
            for m in run.unwrapped().values() for p in inject.adapter_parameters(m)]
    local = torch.tensor([sum(v[0] for v in vals), sum(v[1] for v in vals)], dtype=torch.float64)
    gathered = run.acc.gather(local.to(run.device)[None]).cpu().tolist()
    if any(row != gathered[0] for row in gathered):
        raise RuntimeError(f"adapter replicas diverged across processes: {gathered}")
    return gathered
