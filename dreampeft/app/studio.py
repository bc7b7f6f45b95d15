"""The app's model side: resolve the base model, generate with the base and each trained adapter
under the same prompt and seeds, and score subject fidelity."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .. import presets
from ..dreambooth import DreamBoothConfig
from ..dreambooth.data import scan_folder
from ..eval import EvalError, FidelityScorer
from ..pipeline import load_into_pipeline, set_pipeline_scale, unload
from ..toy import TOY_MODEL
from ..toy.evaluate import find_judge, judge_object_agreement, judge_prompt, judge_similarity
from ..utils import hub_reachable

TOY = "dreampeft toy SDXL (offline; draws shapes, trained in this project)"
TINY = "dreampeft tiny SDXL (offline; random weights, draws noise)"
PRESETS = {TOY: presets.TOY, TINY: presets.TOY, "stabilityai/stable-diffusion-xl-base-1.0": presets.SDXL}


class ModelError(ValueError):
    """A base model the app cannot use; the message says what to pick instead."""


_hub_reachable = hub_reachable  # a module attribute, so tests can stand in for the network


def resolve_model(choice: str, work_dir: Path) -> str:
    """A local folder or hub id for ``choice``; builds the tiny model on first use. Fails fast
    (seconds, not the hub client's retries) when a hub id cannot be reached."""
    choice = (choice or "").strip()
    if choice == TOY:
        if not (TOY_MODEL / "model_index.json").exists():
            raise ModelError(f"{TOY_MODEL} is missing; rebuild it with `python -m dreampeft.toy pretrain {TOY_MODEL}`")
        return str(TOY_MODEL)
    if choice == TINY:
        from ..tiny import save_tiny_sdxl

        folder = work_dir / "models" / "tiny-sdxl"
        if not (folder / "model_index.json").exists():
            save_tiny_sdxl(folder)
        return str(folder)
    if not choice:
        raise ModelError("choose a base model: the tiny offline demo, a hub id or a local folder")
    local = Path(choice).expanduser()
    if local.exists() or choice.startswith((".", "/", "~")):
        if not (local / "model_index.json").exists():
            raise ModelError(f"{choice}: no model_index.json there; give an SDXL pipeline folder")
        return str(local)
    from huggingface_hub import hf_hub_download

    try:  # cached from an earlier download: usable offline
        hf_hub_download(choice, "model_index.json", local_files_only=True)
        return choice
    except Exception:
        pass
    if not _hub_reachable():
        raise ModelError(f"{choice}: the Hugging Face hub cannot be reached from here and the model is "
                         f"not cached; pick '{TOY}' or a local SDXL folder")
    try:
        hf_hub_download(choice, "model_index.json")
    except Exception as exc:
        raise ModelError(f"{choice}: not an SDXL pipeline on the hub ({type(exc).__name__}); "
                         "check the id, or log in for gated models") from None
    return choice


@dataclass
class Row:
    label: str
    images: list
    real: list = field(default_factory=list)
    run: str = "base"  # the run a row draws with (several rows per run in a strength study)
    scale: float = 1.0  # its adapter strength; the base's row 0


@dataclass
class Studio:
    work_dir: Path
    dino_model: str
    clip_model: str
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    _pipe: object = None
    _pipe_model: str | None = None
    _scorer: object = None
    _scorer_error: str = ""  # why the DINO/CLIP models could not be loaded, once tried (restart to retry)
    _judges: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pipeline(self, model: str):
        from ..dreambooth.models import build_pipeline, load_parts

        if self._pipe_model != model:
            cfg = DreamBoothConfig(pretrained_model_name_or_path=model, instance_data_dir=".",
                                   instance_prompt="-")
            self._pipe = build_pipeline(cfg, load_parts(cfg)).to(self.device)
            self._pipe_model = model
        return self._pipe

    def generate(self, model: str, runs: list[tuple], prompt: str, seed: int, n: int,
                 steps: int, resolution: int, scales: Sequence[float] = (1.0,)) -> list[Row]:
        """The base model, then each run at each of ``scales`` (rows "LABEL ×S" when there are
        several), all on the same prompt and seeds seed..seed+n-1."""
        with self._lock:
            pipe = self.pipeline(model)

            def sample() -> list:
                return [pipe(prompt, num_inference_steps=steps, height=resolution, width=resolution,
                             generator=torch.Generator().manual_seed(seed + i)).images[0] for i in range(n)]

            rows = [Row("base", sample(), scale=0.0)]
            for label, run_dir, *adapter in runs:  # a kept checkpoint names its own adapter folder
                load_into_pipeline(pipe, adapter[0] if adapter else run_dir, scale=scales[0])
                try:
                    real = _instance_images(run_dir)
                    for scale in scales:
                        set_pipeline_scale(pipe, scale)
                        name = label if len(scales) == 1 else f"{label} ×{scale:g}"
                        rows.append(Row(name, sample(), real=real, run=label, scale=scale))
                finally:
                    unload(pipe)
        if runs:
            rows[0].real = rows[1].real
        return rows

    def score(self, rows: list[Row], model: str, prompt: str) -> tuple[list[dict], str]:
        """DINO / CLIP-I against each run's own subject images and CLIP-T against the prompt, plus
        on a toy model its judge's similarity (``toy_judge``), its object agreement (``toy_object``)
        and, when the prompt names a size, corner or background, the share of them it reads
        (``toy_prompt``); a note says what could not be scored."""
        if any(not row.real for row in rows):
            raise EvalError("no trained run to compare against: train a method first")
        judge, note = self._judge(model), ""
        try:
            if self._scorer is None:
                if self._scorer_error:  # tried once: offline, every click would wait out the hub client's retries
                    raise EvalError(self._scorer_error)
                self._scorer = FidelityScorer(self.dino_model, self.clip_model)
        except EvalError as exc:
            self._scorer_error = str(exc)
            if judge is None:
                raise
            note = f"DINO/CLIP unavailable ({exc})"
        table = []
        for row in rows:
            entry = {"model": row.label}
            if self._scorer is not None:
                s = self._scorer.score(row.real, row.images, [prompt] * len(row.images))
                entry.update({k: round(s[k], 4) for k in ("dino", "clip_i", "clip_t")})
            if judge is not None:
                entry["toy_judge"] = round(judge_similarity(judge, row.real, row.images), 4)
                entry["toy_object"] = round(judge_object_agreement(judge, row.real, row.images), 4)
                if (asks := judge_prompt(judge, row.images, prompt)) is not None:
                    entry["toy_prompt"] = round(asks, 4)
            table.append(entry)
        return table, note

    def _judge(self, model: str):
        if model not in self._judges:  # loaded once per model, not per click
            self._judges[model] = find_judge(model)
        return self._judges[model]


def _instance_images(run_dir: Path) -> list:
    path = run_dir / "dreambooth_config.json"
    cfg = DreamBoothConfig.from_dict(json.loads(path.read_text()), source=str(path))
    return [e.image for e in scan_folder(cfg.instance_data_dir, cfg.instance_prompt, "--instance_data_dir")]
