"""``python -m dreampeft.toy merge A B --out C``: benches run side by side, one table.

On a 2-core CPU two single-thread bench processes (one per subject, ``OMP_NUM_THREADS=1``) finish
in ~2/3 of the time one two-thread process takes for both (README), but each writes its own
``results.json``. Merging is only honest when the runs measured the same thing, so every setting
that changes a figure must agree; a cell measured twice is refused, except the base's, which the
same seeds make identical (checked)."""

from __future__ import annotations

import json
from pathlib import Path

from ..dreambooth.plots import method_pareto
from ..state import atomic_write
from .bench import results_table

# What makes two benches' figures comparable: everything run_bench writes beside the results
SETTINGS = ("steps", "seeds", "train_seeds", "recipe", "drift_captions", "lr_factor", "overrides",
            "recipe_options", "prompts")
FIGURES = ("subject", "prompt", "instance", "drift")


def _read(folder: Path) -> dict:
    path = folder / "results.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; give folders that `python -m dreampeft.toy bench --out` "
                         "wrote (a bench still running writes it at its end)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a bench's results ({exc})") from None


def _same_base(a: dict, b: dict) -> bool:
    return all(abs(a.get(k, 0.0) - b.get(k, 0.0)) < 1e-9 for k in FIGURES)


def merge_results(folders: list[Path]) -> dict:
    """One ``results.json`` body from several benches' (``ValueError`` naming the folder and the
    setting or cell that disagrees)."""
    if len(folders) < 2:
        raise ValueError("merge: give at least two bench folders")
    saved = [_read(Path(f)) for f in folders]
    first, merged = saved[0], {}
    for folder, bench in zip(folders[1:], saved[1:]):
        for key in SETTINGS:
            if bench.get(key) != first.get(key):
                raise ValueError(f"{folder}: {key} is {bench.get(key)!r} where {folders[0]} has "
                                 f"{first.get(key)!r}; only benches run with the same settings can be merged")
    for folder, bench in zip(folders, saved):
        for cell, figures in bench["results"].items():
            if cell in merged and not (cell.startswith("base/") and _same_base(merged[cell], figures)):
                raise ValueError(f"{folder}: {cell} was measured in an earlier folder too; merge benches of "
                                 "different subjects or methods")
            merged[cell] = figures
    return {**{k: first[k] for k in SETTINGS if k in first}, "merged_from": [str(f) for f in folders],
            "results": merged}


def rows_and_subjects(results: dict) -> tuple[list[str], list[str]]:
    """The methods (base first) and subjects in the order the benches listed them; every method
    must have every subject, or the table would have holes."""
    rows, subjects = [], []
    for cell in results:
        row, subject = cell.split("/", 1)
        rows += [row] if row not in rows else []
        subjects += [subject] if subject not in subjects else []
    if missing := [f"{r}/{s}" for r in rows for s in subjects if f"{r}/{s}" not in results]:
        raise ValueError(f"merge: no figures for {', '.join(missing)}; every method needs every subject "
                         "(run the bench for the missing cells, or merge fewer folders)")
    return ["base", *[r for r in rows if r != "base"]], subjects


def merge_benches(folders: list[str | Path], out: str | Path) -> str:
    """Write the merged ``results.json``, ``results.md``, ``pareto-SUBJECT.png`` (redrawn from the
    merged cells) and ``grid.png`` (the benches' grids one below the other) into ``out``; returns the
    table."""
    from PIL import Image

    folders, out = [Path(f) for f in folders], Path(out)
    if any(out.resolve() == f.resolve() for f in folders):
        raise ValueError(f"merge: --out {out} is one of the benches; give a new folder (their own results stay)")
    body = merge_results(folders)
    rows, subjects = rows_and_subjects(body["results"])
    out.mkdir(parents=True, exist_ok=True)
    for subject in subjects:
        method_pareto({row: body["results"][f"{row}/{subject}"] for row in rows}, subject,
                      out / f"pareto-{subject}.png")
    grids = [Image.open(f / "grid.png").convert("RGB") for f in folders if (f / "grid.png").exists()]
    if grids:
        stacked, top = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white"), 0
        for g in grids:
            stacked.paste(g, (0, top))
            top += g.height
        stacked.save(out / "grid.png")
    table = results_table(body["results"], rows, subjects)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(body, indent=1) + "\n"))
    return table
