"""``python -m dreampeft.toy scales``: what trained adapters draw at lower strength.

Every community UI has a LoRA strength (A1111's ``<lora:name:0.7>``, ComfyUI's ``strength_model``,
diffusers' ``set_adapters`` weights), and a subject that leaks into every prompt is commonly used at
0.6–0.8. The bench measures one point per method, at scale 1; this study loads the bench's saved
runs and draws the same prompts with the same seeds at each scale: subject fidelity, prompt fidelity
and drift per method, subject and scale (mean ± sd over the training seeds), and per subject a plot
of subject against prompt fidelity along the scales, one line per method — how much subject each
method keeps at the prompt fidelity a user asks for. At scale 1 it redraws the bench's own images,
so its figures there are the bench's.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..dreambooth.plots import scale_pareto
from .bench import DRIFT_CAPTIONS, _load, draw, judged, results_table, summarise

CONFIG = "dreambooth_config.json"  # what the trainer writes beside every run


def bench_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders from ``paths``: each a run (it holds the trainer's config) or a bench output
    (every run under its ``runs/``). Raises naming a path that is neither."""
    runs = []
    for path in map(Path, paths):
        found = [path] if (path / CONFIG).is_file() else sorted(p.parent for p in path.glob(f"runs/*/{CONFIG}"))
        if not found:
            raise ValueError(f"{path}: neither a bench run (no {CONFIG}) nor a bench output with runs/*/{CONFIG}; "
                             "pass the --out folder of 'python -m dreampeft.toy bench' or one of its runs")
        runs += found
    return runs


def run_info(run: Path) -> tuple[str, str]:
    """(subject, method) of a bench run, read from the config the trainer saved beside it."""
    config = json.loads((run / CONFIG).read_text())
    return Path(config["instance_data_dir"]).name, config["adapter"]


def row_name(method: str, scale: float) -> str:
    return f"{method} ×{scale:g}"


def scale_study(model_dir: str | Path, runs: list[Path], scales: list[float], out: str | Path, seeds: int = 4,
                drift: int = DRIFT_CAPTIONS, log=print) -> dict:
    """Each run at each of ``scales``, judged as the bench judges (``bench.judged``); writes
    ``scales.json``, ``scales.md`` and ``scales-SUBJECT.png`` under ``out`` and returns the cells
    ({"method ×scale/subject": summarised cell})."""
    from ..pipeline import load_into_pipeline, set_pipeline_scale, unload

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = {run: run_info(run) for run in runs}  # every config read before the first image
    subjects = sorted({subject for subject, _ in info.values()})
    methods = list(dict.fromkeys(method for _, method in info.values()))
    pipe, judge = _load(model_dir)
    base = draw(pipe, judge, seeds, drift)  # the base's images do not depend on the subject
    results = {f"base/{s}": judged(judge, base, s) for s in subjects}  # as the bench keeps its base
    cells = defaultdict(list)
    for run, (subject, method) in info.items():
        load_into_pipeline(pipe, run)
        try:
            for scale in scales:
                set_pipeline_scale(pipe, scale)
                r = {"run": run.name, **judged(judge, draw(pipe, judge, seeds, drift), subject)}
                cells[row_name(method, scale), subject].append(r)
                log(f"{run.name} ×{scale:g}: subject {r['subject']:.3f} (own prompt {r['instance']:.3f}), "
                    f"prompt {r['prompt']:.3f}" + (f", drift {r['drift']:.3f}" if drift else ""))
        finally:
            unload(pipe)
    results.update({f"{row}/{subject}": summarise(rs) for (row, subject), rs in cells.items()})
    rows = ["base", *(row_name(m, s) for m in methods for s in scales)]
    if partial := [r for r in rows if not all(f"{r}/{s}" in results for s in subjects)]:
        log(f"not in scales.md (runs for only some of {', '.join(subjects)}; in scales.json and the plots): "
            + ", ".join(partial))
    rows = [r for r in rows if r not in partial]
    for subject in subjects:
        lines = {m: [(s, results[f"{row_name(m, s)}/{subject}"]) for s in scales
                     if f"{row_name(m, s)}/{subject}" in results] for m in methods}
        scale_pareto(lines, results[f"base/{subject}"], subject, out / f"scales-{subject}.png")
    (out / "scales.json").write_text(json.dumps(
        {"scales": scales, "seeds": seeds, "drift_captions": drift, "runs": [str(r) for r in runs],
         "results": results}, indent=1) + "\n")
    (out / "scales.md").write_text(results_table(results, rows, subjects) + "\n")
    return results
