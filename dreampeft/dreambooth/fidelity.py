"""Fidelity along training (``--eval_steps``): the same evaluation set at every evaluation, scored.

The set: recontext prompts with the identifier (on the toy, its benchmark's recontext prompts; else
five of the 25 DreamBooth prompts) and the class prompt without it, ``--eval_images`` seeds each.
Per evaluation:

* subject fidelity — the toy judge's probability that the object is the subject when the judge
  knows the subject (its benchmark subjects), else the chance it reads the instance images' object
  in a generated one (``judge_object_agreement``, the app's ``toy_object``; the whole-image
  similarity stays beside it as ``judge_similarity``); off the toy, DINO against the instance
  images (CLIP-I beside it);
* prompt fidelity — the judge's share of the attributes each prompt asks for; off the toy, CLIP-T;
* drift — 1 − the mean cosine similarity between the class prompt's images now and at step 0 (same
  seeds), in the judge's or DINO's features: how far the class itself has moved (language drift,
  overfitting).

The balanced score of an evaluation is its gain over step 0: (subject − subject₀) + w·(prompt −
prompt₀), w = 1 on the toy (both in [0, 1]) and 10 for CLIP-T (whose spread across methods is about
a tenth of DINO's); an evaluation whose drift exceeds ``DRIFT_LIMIT`` is not eligible. The score of
an evaluation depends on step 0 and itself only, so the best so far is known at every evaluation.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import inject
from ..state import atomic_write, save_adapter
from .ema import adapter_tensors

DRIFT_LIMIT = 0.5
PROMPT_WEIGHT = {"toy": 1.0, "clip": 10.0}
CSV_NAME, PLOT_NAME, SNAPSHOTS = "fidelity.csv", "fidelity.png", "eval"


def subject_phrase(instance_prompt: str) -> str:
    """"a photo of sks dog" → "sks dog"."""
    return re.sub(r"^(an? )?(photo of )?(an? )?", "", instance_prompt.strip(), flags=re.I) or instance_prompt


def class_prompt_of(instance_prompt: str) -> str:
    """The instance prompt without its identifier (the subject phrase's first word, or the phrase
    when it is one word): "a photo of sks dog" → "a photo of dog"."""
    subject = subject_phrase(instance_prompt)
    identifier = subject.split()[0] if len(subject.split()) > 1 else subject
    return " ".join(w for w in instance_prompt.split() if w != identifier)


@dataclass
class EvalPlan:
    prompts: list[str]
    attributes: list[dict]  # per prompt: what the toy judge reads (empty off the toy)
    class_prompt: str
    images: int  # per prompt, seeds seed … seed + images − 1


def make_plan(cfg, toy: bool) -> EvalPlan:
    subject = subject_phrase(cfg.instance_prompt)
    class_prompt = cfg.eval_class_prompt or cfg.class_prompt or class_prompt_of(cfg.instance_prompt)
    if cfg.eval_prompts:  # on the toy, the judge reads whatever size, position and background they name
        from ..toyworld import asked

        attributes = [asked(p) if toy else {} for p in cfg.eval_prompts]
        return EvalPlan(list(cfg.eval_prompts), attributes, class_prompt, cfg.eval_images)
    if toy:
        from ..toy.bench import RECONTEXT

        prompts = [p.replace("sks object", subject) for p in RECONTEXT]
        return EvalPlan(prompts, list(RECONTEXT.values()), class_prompt, cfg.eval_images)
    from ..eval import evaluation_prompts

    prompts = evaluation_prompts(subject)[::5]
    return EvalPlan(prompts, [{} for _ in prompts], class_prompt, cfg.eval_images)


class Metrics:
    """The toy judge, or DINO + CLIP, loaded once per run (on the CPU when the GPU is busy training)."""

    def __init__(self, cfg, instance_images: list):
        from ..toy.evaluate import find_judge

        self.judge, self.scorer, self.skipped = find_judge(cfg.pretrained_model_name_or_path), None, None
        self.real = instance_images
        if self.judge is not None:
            self.kind, self.subject_class = "toy", self._known_subject()
            return
        from ..eval import EvalError, FidelityScorer
        from ..utils import loadable

        self.kind = "clip"
        missing = [f"--{flag} {name}" for flag, name in (("dino_model", cfg.dino_model), ("clip_model", cfg.clip_model))
                   if not loadable(name)]
        if missing:  # fail in seconds, not after the hub client's minute of retries
            self.skipped = (f"{', '.join(missing)}: not a local folder, not in the hub cache, and the hub "
                            "cannot be reached; pass local folders (or train on the toy, whose judge needs none)")
            return
        try:
            self.scorer = FidelityScorer(cfg.dino_model, cfg.clip_model)
        except EvalError as exc:
            self.skipped = str(exc)

    def _known_subject(self) -> int | None:
        from ..toy.evaluate import judge_images
        from ..toy.models import HEADS
        from ..toyworld import ALL_SUBJECTS

        votes = judge_images(self.judge, [im.resize((64, 64)) for im in self.real])["object"].argmax(-1)
        top = int(votes.mode().values)
        return top if HEADS["object"][top] in ALL_SUBJECTS else None

    @torch.no_grad()
    def features(self, images: list) -> torch.Tensor:
        if self.judge is not None:
            from ..toy.evaluate import _pixels, _square64

            return self.judge.embed(_pixels([_square64(im) for im in images]))
        return self.scorer.dino_features(images)

    def score(self, images: list, prompts: list[str], attributes: list[dict]) -> dict:
        if self.judge is None:
            s = self.scorer.score(self.real, images, prompts)
            return {"subject": s["dino"], "prompt": s["clip_t"], "dino": s["dino"], "clip_i": s["clip_i"],
                    "clip_t": s["clip_t"]}
        from ..toy.evaluate import attribute_hits, judge_images, judge_object_agreement, judge_similarity

        probs = judge_images(self.judge, images)
        if self.subject_class is not None:
            subject = float(probs["object"][:, self.subject_class].mean())
        else:  # whole-image similarity would score a copied background as a drawn subject
            subject = judge_object_agreement(self.judge, self.real, images)
        hits = attribute_hits(probs, attributes)
        return {"subject": subject, "prompt": sum(hits) / len(hits) if hits else float("nan"),
                "judge_similarity": judge_similarity(self.judge, self.real, images)}


@dataclass
class History:
    """Every evaluation so far and what the best one is; saved in checkpoints, so resume is exact."""

    rows: list = field(default_factory=list)
    reference: torch.Tensor | None = None  # the class prompt's step-0 image features (drift)
    best: dict | None = None  # {"step", "score", "tensors"}: the best eligible evaluation's adapter

    def state_dict(self) -> dict:
        return {"rows": self.rows, "reference": self.reference, "best": self.best}

    @classmethod
    def from_state(cls, state: dict) -> "History":
        return cls(list(state["rows"]), state["reference"], state["best"])


def balanced(row: dict, first: dict, kind: str) -> float:
    return (row["subject"] - first["subject"]) + PROMPT_WEIGHT[kind] * (row["prompt"] - first["prompt"])


def generate(pipe, prompts: list[str], n: int, cfg) -> list:
    """n images per prompt; image k of every prompt uses seed + k, whatever the batching. Small
    images go through the pipeline together (one call per prompt costs more than the denoising).

    DPM-Solver++ (2M) at ``--eval_inference_steps``: an evaluation is a relative measure repeated
    many times, so it takes the few-step solver. Measured on the toy (5 recontext prompts × 8 seeds,
    star adapters at steps 0/100/300): 10 DPM++ steps score subject 0.151/0.323/0.354 and prompt
    0.750/0.643/0.679 where 25 Euler steps score 0.145/0.316/0.370 and 0.768/0.679/0.696, in 0.42×
    the time."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    jobs = [(p, k) for p in prompts for k in range(n)]
    batch = 32 if cfg.resolution <= 128 else n
    images = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        images += pipe([p for p, _ in chunk], num_inference_steps=cfg.eval_inference_steps, height=cfg.resolution,
                       width=cfg.resolution, generator=[torch.Generator().manual_seed(cfg.seed + k)
                                                         for _, k in chunk]).images
    return images


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def snapshot(models: dict, folder: Path, step: int) -> Path:
    """The evaluated weights as a native adapter (the app generates from any of them)."""
    return save_adapter(models, folder / f"step-{step:06d}", extra_metadata={"trained_steps": step})


REASONS = {"balanced": f"highest gain over step 0, (subject − subject₀) + w·(prompt − prompt₀), among the "
                       f"evaluations with drift ≤ {DRIFT_LIMIT}",
           "subject": "highest subject fidelity", "last": "the last step (--keep_best last)"}


class Evaluator:
    """Runs the evaluation set at step 0, every ``--eval_steps`` and at the end; keeps the history,
    ``fidelity.csv``, a snapshot of each evaluated adapter and the best one (``--keep_best``)."""

    def __init__(self, run):
        from ..toy.evaluate import is_toy

        cfg = run.cfg
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.plan = make_plan(cfg, is_toy(cfg.pretrained_model_name_or_path))
        self.metrics = Metrics(cfg, [ex.image for ex in run.instance])
        self.history = History()
        if self.metrics.skipped:
            note(f"--eval_steps: evaluation skipped, no metric models ({self.metrics.skipped})")

    @property
    def active(self) -> bool:
        return not self.metrics.skipped

    def due(self, step: int, total: int) -> bool:
        every = self.cfg.eval_every
        return self.active and every > 0 and (step == 0 or step == total or step % every == 0)

    @torch.no_grad()
    def evaluate(self, run, step: int) -> dict:
        import time

        from ..eval import mean_paired_cosine

        t0, cfg, models, pipe = time.perf_counter(), self.cfg, run.unwrapped(), run.pipeline()
        n, plan = self.plan.images, self.plan
        with run.averaged(), run.acc.autocast(), inject.eval_mode(*models.values()):
            everything = generate(pipe, [*plan.prompts, plan.class_prompt], n, cfg)
            images, klass = everything[:-n], self.metrics.features(everything[-n:])
            snapshot(models, self.out / SNAPSHOTS, step)
            row = {"step": step, **self.metrics.score(images, [p for p in plan.prompts for _ in range(n)],
                                                      [a for a in plan.attributes for _ in range(n)])}
            if self.history.reference is None:  # this evaluation is the reference: no drift by definition
                self.history.reference = klass  # (cos(x, x) computes to 1 - 6e-8 on some CPUs)
            reference = self.history.reference
            row["drift"] = 0.0 if reference is klass else 1.0 - mean_paired_cosine(klass, reference)
            first = self.history.rows[0] if self.history.rows else row
            row["score"] = balanced(row, first, self.metrics.kind)
            self._keep(row, models)
        row["seconds"] = time.perf_counter() - t0
        self.history.rows.append(row)
        write_csv(self.history.rows, self.out / CSV_NAME)
        return row

    def _keep(self, row: dict, models: dict) -> None:
        mode, best = self.cfg.keep_best, self.history.best
        if mode == "last":
            return
        value = row["score"] if mode == "balanced" else row["subject"]
        eligible = mode == "subject" or row["drift"] <= DRIFT_LIMIT
        if eligible and (best is None or value > best["value"]):
            self.history.best = {"step": row["step"], "value": value, "tensors": adapter_tensors(models)}

    def chosen(self, last_step: int) -> dict | None:
        """The evaluation to export instead of the last weights, or None (the last ones)."""
        best = self.history.best
        return best if best is not None and best["step"] != last_step else None
