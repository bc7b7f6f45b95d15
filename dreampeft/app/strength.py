"""The app's strength study: every finished run redrawn at several adapter strengths on one prompt,
scored, and plotted as subject against prompt fidelity — which strength keeps the subject without
losing the prompt, measured instead of guessed.

Every community UI has a LoRA weight slider (A1111's ``<lora:name:0.7>``, ComfyUI's
``strength_model``), and a subject that leaks into every prompt is commonly used at 0.6–0.8. On the
toy, LoRA with LoCon at ×0.5 kept 60–75% of its star at 0.95× the base's prompt fidelity, where ×1
fell to 0.81× (README, ``bench/results/toy_scales_locon.md``); the same study runs here on the user's
own subject and prompt.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters import ConfigError
from ..dreambooth.plots import scale_pareto
from ..pipeline import check_scale

STRENGTH_COLUMNS = ["model", "strength", "subject", "prompt"]
DEFAULT_STRENGTHS = "0.25, 0.5, 0.75, 1"
MAX_STRENGTHS = 8  # a study draws n images per strength per run: keep a click's cost bounded
# (score key, what the axis says), best first: the toy judge reads the toy world exactly (its object
# agreement, not its whole-image similarity, in which a kept background counts as much as the subject);
# DINO and CLIP-T are the DreamBooth paper's metrics on real images
SUBJECT_SCORES = (("toy_object", "the toy judge reads your images' object"), ("dino", "DINO vs your images"))
PROMPT_SCORES = (("toy_prompt", "prompt fidelity (toy judge: the size, corner, background asked)"),
                 ("clip_t", "prompt fidelity (CLIP-T)"))


def parse_strengths(text: str) -> list[float]:
    """"0.25, 0.5, 1" → [0.25, 0.5, 1.0]: distinct, in the order given, each within the adapter
    scale's range; raises naming the field and the bad entry."""
    entries = [e for e in (text or "").replace(";", ",").split(",") if e.strip()]
    if not entries:
        raise ConfigError(f"strengths: give one or more numbers separated by commas, e.g. {DEFAULT_STRENGTHS}")
    strengths = []
    for entry in entries:
        try:
            value = float(entry)
        except ValueError:
            raise ConfigError(f"strengths: {entry.strip()!r} is not a number (e.g. {DEFAULT_STRENGTHS})") from None
        check_scale(value, "each strength")
        if value not in strengths:
            strengths.append(value)
    if len(strengths) > MAX_STRENGTHS:
        raise ConfigError(f"strengths: at most {MAX_STRENGTHS} values (got {len(strengths)})")
    return strengths


def pick_scores(table: list[dict]) -> tuple[tuple[str, str], tuple[str, str]]:
    """(subject, prompt) scores every row of ``table`` (``Studio.score``) has, each as (key, axis
    label), the toy judge's before DINO and CLIP-T; raises saying what is missing."""
    def first(options, what):
        for key, label in options:
            if all(key in row for row in table):
                return key, label
        raise ConfigError(f"no {what} score for this model: " + {
            "subject": "the DINO model could not be loaded and the model has no toy judge",
            "prompt": "CLIP could not be loaded; on the toy model, name a size, corner or background in "
                      "the prompt (e.g. 'a sks object on a green background')"}[what])

    return first(SUBJECT_SCORES, "subject"), first(PROMPT_SCORES, "prompt")


def strength_results(rows: list, table: list[dict], path: Path) -> list[list]:
    """Draws the study's plot at ``path`` (one line per run through its strengths, the base as a
    cross, the 0.9× base prompt bar) and returns its table rows (``STRENGTH_COLUMNS``); ``rows`` are
    the studio's generated rows and ``table`` their scores, in the same order."""
    (subject, subject_label), (prompt, prompt_label) = pick_scores(table)
    cells = [{"subject": t[subject], "prompt": t[prompt]} for t in table]
    lines: dict[str, list] = {}
    for row, cell in zip(rows[1:], cells[1:]):
        lines.setdefault(row.run, []).append((row.scale, cell))
    scale_pareto(lines, cells[0], subject_label, path, xlabel=prompt_label, fixed_limits=prompt == "toy_prompt")
    return [[row.run, row.scale, cell["subject"], cell["prompt"]] for row, cell in zip(rows, cells)]


def strength_widgets(gr) -> tuple:
    """The study's controls and outputs, laid out where they are called (tab 2)."""
    with gr.Accordion("Strength study: each finished run at several adapter strengths", open=False):
        with gr.Row():
            strengths = gr.Textbox(DEFAULT_STRENGTHS, label="Strengths (comma-separated, each −4…4)",
                                   elem_id="strengths", scale=3)
            button = gr.Button("Run the strength study", elem_id="strength_study")
        with gr.Row():
            plot = gr.Image(label="Subject vs prompt fidelity along the strengths (× base)", type="filepath",
                            interactive=False, elem_id="strength_plot", height=360)
            table = gr.Dataframe(headers=STRENGTH_COLUMNS, label="Scores per run and strength",
                                 interactive=False, elem_id="strength_table")
        message = gr.Markdown(elem_id="strength_message")
    return strengths, button, plot, table, message
