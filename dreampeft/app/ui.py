"""The Gradio app: upload → train (queued, live) → generate side by side → scores and downloads.

Handlers live on ``App`` and take and return plain values, so tests can call them without a
browser; ``App.blocks()`` only lays out widgets and wires them to the handlers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from ..adapters import METHODS, ConfigError
from ..dreambooth import DreamBoothConfig, DreamBoothError
from ..dreambooth.config import MAX_RESOLUTION
from ..dreambooth.plots import fidelity_plot, pareto_plot
from ..eval import EvalError
from .forms import (IMAGE_SUFFIXES, RUN, TRISTATE, UploadError, check_uploads, option_specs, options_from_values,
                    prior_options, run_option_specs, stage_uploads)
from .jobs import JobQueue
from ..pipeline import check_scale
from ..presets import RESOLUTION, SDXL, learning_rates, method_preset, parse_methods
from .strength import strength_results, strength_widgets, parse_strengths
from .studio import PRESETS, TOY, ModelError, Studio, resolve_model

JOB_COLUMNS = ["run", "method", "state", "step", "loss", "ETA", "exported step", "note"]
SCORE_COLUMNS = ["model", "dino", "clip_i", "clip_t", "toy_judge", "toy_object", "toy_prompt"]
DOWNLOADED = ("dreampeft_adapter.safetensors", "pytorch_lora_weights.safetensors", "README.md",
              "dreambooth_config.json", "export_report.json")


def preset_defaults(model: str) -> tuple | None:
    """(train resolution, generation resolution, learning rate per method, then every method option in
    ``option_specs`` order) for a preset model; None for a custom id or folder (the fields keep what
    the user set). An empty name gives SDXL's; the 64 px presets take the toy's measured rates and
    options (FourierFT's zeros start among them), all from ``dreampeft.presets``."""
    if model in PRESETS or not model:
        preset = PRESETS.get(model, SDXL)
        options = [method_preset(preset, s.method).options.get(s.name, s.default) for s in option_specs(list(METHODS))]
        return (RESOLUTION[preset],) * 2 + tuple(learning_rates(preset).values()) + tuple(options)
    return None


def exported_note(progress: dict) -> str:
    """The runs table's note: why a finished run exported step 0 (its untrained adapter, so it draws
    what the base draws), from the trainer's reason; empty otherwise."""
    if progress["exported_step"] != 0:
        return ""
    return progress["exported_reason"].rpartition(": step 0, ")[2] or "the base model"


def check_generation(seed, n, steps, resolution, scale) -> None:
    """The generate form's numbers, checked on the server too (an API call can send anything)."""
    if None in (seed, n, steps, resolution, scale):
        raise ConfigError("fill in every number")
    for name, value, low, high in (("images per model", n, 1, 8), ("denoising steps", steps, 1, 100),
                                   ("resolution", resolution, 8, MAX_RESOLUTION)):
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high} (got {value})")
    if int(resolution) % 8:
        raise ConfigError(f"resolution {resolution}: use a multiple of 8")
    check_scale(scale)


class App:
    def __init__(self, work_dir: str | Path, model: str = TOY, dino_model: str | None = None,
                 clip_model: str | None = None, queue: JobQueue | None = None):
        from ..eval import DEFAULT_CLIP, DEFAULT_DINO

        self.work_dir = Path(work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.queue = queue or JobQueue()
        self.studio = Studio(self.work_dir, dino_model or DEFAULT_DINO, clip_model or DEFAULT_CLIP)
        self.specs = option_specs(list(METHODS))  # the order the widgets are laid out in
        self.run_specs = run_option_specs()
        self._defaults = preset_defaults(model) or preset_defaults("")

    # -- training ---------------------------------------------------------------------------
    def train(self, model: str, files: list[str] | None, instance_prompt: str, class_word: str,
              methods: list[str], steps: int, resolution: int, seed: int, validate_every: int,
              *option_values) -> str:
        """Validate everything, then queue one run per method; returns a message for the UI."""
        lrs, values = option_values[:len(METHODS)], option_values[len(METHODS):len(METHODS) + len(self.specs)]
        run_values = option_values[len(METHODS) + len(self.specs):]
        try:
            if not methods:
                raise ConfigError("choose at least one method to train")
            methods = parse_methods(",".join(methods), "Methods")
            blank = [m for m in methods if lrs[list(METHODS).index(m)] is None]
            if blank or None in (steps, resolution, seed, validate_every):
                raise ConfigError(f"fill in {'the learning rate of ' + ', '.join(blank) if blank else 'every number'}")
            path = resolve_model(model, self.work_dir)
            data = stage_uploads(check_uploads(files), self.work_dir / "uploads")
            prompt = instance_prompt.strip() or f"a photo of sks {class_word.strip() or 'object'}"
            run_options = prior_options(options_from_values(self.run_specs, run_values, RUN),
                                        self.work_dir / "class_images", path, prompt, int(resolution))
            configs = [self._config(path, data, prompt, m, int(steps), int(resolution), int(seed),
                                    int(validate_every), float(lrs[list(METHODS).index(m)]),
                                    options_from_values(self.specs, values, m), run_options) for m in methods]
        except (ConfigError, UploadError, ModelError, DreamBoothError, ValueError) as exc:
            return f"**Cannot start:** {exc}"
        for cfg in configs:  # each its own folder, made now: two clicks in one second never share one
            runs = self.work_dir / "runs"
            runs.mkdir(parents=True, exist_ok=True)
            out = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), suffix=f"-{cfg.adapter}", dir=runs))
            cfg.output_dir, cfg.events = str(out), str(out / "events.jsonl")
        jobs = [self.queue.submit(cfg) for cfg in configs]
        return f"Queued {', '.join(j.label for j in jobs)} on `{model}`."

    def _config(self, model: str, data: Path, prompt: str, method: str, steps: int, resolution: int,
                seed: int, validate_every: int, lr: float, options: dict, run_options: dict) -> DreamBoothConfig:
        return DreamBoothConfig(  # output_dir and events are set when the run is queued
            pretrained_model_name_or_path=model, instance_data_dir=str(data), instance_prompt=prompt,
            adapter=method, adapter_options=options,
            max_train_steps=steps, resolution=resolution, seed=seed, learning_rate=lr,
            validation_prompt=prompt, num_validation_images=1, validation_steps=validate_every,
            inference_steps=10 if resolution <= 128 else 25,
            # fidelity at step 0, at each validation (or only at the end) — the curves the app draws
            eval_steps=validate_every or steps, eval_images=1,
            dino_model=self.studio.dino_model, clip_model=self.studio.clip_model, **run_options)

    def stop(self) -> str:
        n = self.queue.stop_all()
        return f"Stopped {n} run(s)." if n else "Nothing is running."

    def progress(self):
        """Job rows, the newest validation samples, download archives of finished runs, the
        fidelity plots so far (``evaluations``, drawn as PNGs) and the kept checkpoints Generate can use."""
        import gradio as gr

        rows, samples, downloads, kept, progresses = [], [], [], [], []
        for job in self.queue.jobs:
            p = job.progress()
            progresses.append((job, p))
            step = (f"{p['step']}/{p['total']}" if p["total"] else
                    "class images {}/{}".format(*p["class_images"]) if p["class_images"] else "–")
            loss = f"{p['loss']:.4f}" if p["loss"] is not None else "–"
            eta = f"{p['eta_s']:.0f} s" if p["eta_s"] is not None else "–"
            state = p["state"] + (f": {p['error']}" if p["error"] else "")
            rows.append([job.id, job.method, state, step, loss, eta,
                         "–" if p["exported_step"] is None else p["exported_step"], exported_note(p)])
            samples += [(self.public(img), f"{job.label} step {at}") for img, at in p["images"]]
            if job.state == "done":
                downloads.append(str(self._archive(job.output_dir)))
                kept += [f"{job.label} @ step {e['step']}" for e in p["evals"]]
        curves, pareto = self._plots(*self.evaluations(progresses))
        return rows, samples[-8:], downloads, curves, pareto, gr.update(choices=kept)

    def evaluations(self, progresses: list[tuple] | None = None) -> tuple[dict[str, list[dict]], dict[str, int]]:
        """Every run's fidelity evaluations so far ("lora (run 1)" → rows with step, subject, prompt,
        drift, score) and the step each finished run exported; from ``progresses`` ((job,
        job.progress()) pairs) when the caller has just read them."""
        runs, chosen = {}, {}
        for job, p in progresses if progresses is not None else ((j, j.progress()) for j in self.queue.jobs):
            if p["evals"]:
                runs[job.label] = p["evals"]
            if p["exported_step"] is not None and any(e["step"] == p["exported_step"] for e in p["evals"]):
                chosen[job.label] = p["exported_step"]
        return runs, chosen

    def _plots(self, runs: dict[str, list[dict]], chosen: dict[str, int]) -> tuple[str | None, str | None]:
        """The curves and the Pareto plot of ``evaluations`` as PNGs under ``public/plots``, drawn
        again only when an evaluation arrives. Images, not Gradio's live plots: gradio 6.31's
        LinePlot/ScatterPlot stop redrawing when a second run's rows arrive by the Timer (the
        curves stayed empty or showed only the first run)."""
        if not runs:
            return None, None
        key = hashlib.sha1(json.dumps([runs, chosen], sort_keys=True, default=str).encode()).hexdigest()[:16]
        folder = self.public_dir / "plots"
        curves, pareto = folder / f"fidelity-{key}.png", folder / f"pareto-{key}.png"
        if not pareto.exists():
            folder.mkdir(parents=True, exist_ok=True)
            for draw, path in ((fidelity_plot, curves), (pareto_plot, pareto)):
                draw(runs, path.with_suffix(".tmp.png"), chosen).rename(path)  # whole files only
            for stale in set(folder.glob("*.png")) - {curves, pareto}:  # every page gets the new pair next tick
                if not stale.name.endswith(".tmp.png"):
                    stale.unlink(missing_ok=True)
        return str(curves), str(pareto)

    @property
    def public_dir(self) -> Path:
        """The only folder the server serves files from (``allowed_paths``): copies of what the UI
        shows, never the runs, uploads or models themselves."""
        return self.work_dir / "public"

    def public(self, path: str | Path) -> str:
        path = Path(path)
        copy = self.public_dir / path.parent.parent.name / path.parent.name / path.name
        if not copy.exists():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy.with_suffix(".tmp"))
            copy.with_suffix(".tmp").rename(copy)
        return str(copy)

    def _archive(self, run_dir: Path) -> Path:
        zip_path = self.public_dir / "downloads" / f"{run_dir.name}.zip"
        if not zip_path.exists():
            zip_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = zip_path.with_suffix(".tmp")
            with zipfile.ZipFile(tmp, "w") as zf:
                for name in DOWNLOADED:
                    if (run_dir / name).exists():
                        zf.write(run_dir / name, f"{run_dir.name}/{name}")
            tmp.rename(zip_path)
        return zip_path

    # -- generation ---------------------------------------------------------------------------
    def generate(self, model: str, prompt: str, seed: int, n: int, steps: int, resolution: int,
                 scale: float, checkpoints: list[str] | None = None) -> tuple[list, list[list], str]:
        """Base model, every finished run on ``model`` and any kept ``checkpoints`` ("LABEL @ step N"):
        same prompt, same seeds; then scores."""
        try:
            path, runs = self._runs(model, prompt, seed, n, steps, resolution, scale, checkpoints)
            rows = self.studio.generate(path, runs, prompt, int(seed), int(n), int(steps),
                                        int(resolution), [float(scale)])
        except (ConfigError, ModelError, DreamBoothError, ValueError) as exc:
            return [], [], f"**Cannot generate:** {exc}"
        gallery = [(img, f"{row.label} · seed {int(seed) + i}") for row in rows for i, img in enumerate(row.images)]
        note = "" if runs else "No finished run on this model yet: showing the base model only. "
        try:
            table, missing = self.studio.score(rows, path, prompt)
        except (EvalError, OSError, ValueError) as exc:
            return gallery, [], note + f"Scores unavailable: {exc}"
        scores = [[r.get(c, "–") for c in SCORE_COLUMNS] for r in table]
        note += f"Scored {len(rows)} rows × {int(n)} image(s) against the subject images."
        return gallery, scores, note + (f" {missing}." if missing else "")

    def strength_study(self, model: str, prompt: str, seed: int, n: int, steps: int, resolution: int,
                       strengths: str, checkpoints: list[str] | None = None) -> tuple[str | None, list[list], str]:
        """Every finished run (and kept ``checkpoints``) at each of ``strengths`` on one prompt and
        seeds, scored: the plot of subject against prompt fidelity (``strength.py``), its table, a note."""
        try:
            scales = parse_strengths(strengths)
            path, runs = self._runs(model, prompt, seed, n, steps, resolution, 1.0, checkpoints)
            if not runs:
                raise ConfigError("no finished run on this model yet: train a method first")
            rows = self.studio.generate(path, runs, prompt, int(seed), int(n), int(steps), int(resolution), scales)
            table, missing = self.studio.score(rows, path, prompt)
            plot = self._study_path()
            cells = strength_results(rows, table, plot)
        except (ConfigError, ModelError, DreamBoothError, EvalError, OSError, ValueError) as exc:
            return None, [], f"**Cannot run the study:** {exc}"
        return str(plot), cells, (f"{len(runs)} run(s) × {len(scales)} strength(s) × {int(n)} image(s), same "
                                  f"seeds as the base's. {missing + '.' if missing else ''}")

    def _study_path(self, keep: int = 8) -> Path:
        """A new file for a study's plot under ``public/studies``, of which the ``keep`` newest stay
        (a page shows the latest; two pages may each be showing one)."""
        folder = self.public_dir / "studies"
        folder.mkdir(parents=True, exist_ok=True)
        studies = sorted(folder.glob("strength-*.png"), key=lambda p: p.stat().st_mtime)
        for old in studies[:max(0, len(studies) - keep + 1)]:
            old.unlink(missing_ok=True)
        fd, name = tempfile.mkstemp(prefix="strength-", suffix=".png", dir=folder)
        os.close(fd)
        return Path(name)

    def _runs(self, model: str, prompt: str, seed, n, steps, resolution, scale,
              checkpoints: list[str] | None) -> tuple[str, list[tuple]]:
        """The checked model path and (label, run folder[, adapter folder]) of every finished run on
        it and each kept checkpoint chosen; raises with what to fix in the form."""
        path = resolve_model(model, self.work_dir)
        if not (prompt or "").strip():
            raise ConfigError("write a prompt, e.g. 'a photo of sks object on the beach'")
        check_generation(seed, n, steps, resolution, scale)
        done = [j for j in self.queue.jobs if j.state == "done"]
        runs = [(j.label, j.output_dir) for j in done if j.cfg.pretrained_model_name_or_path == path]
        return path, runs + self._kept(done, path, checkpoints or [])

    @staticmethod
    def _kept(done: list, model: str, checkpoints: list[str]) -> list[tuple]:
        """(label, run folder, adapter folder) of each chosen "LABEL @ step N" of a finished run."""
        by_label = {j.label: j for j in done if j.cfg.pretrained_model_name_or_path == model}
        picked = []
        for choice in checkpoints:
            label, _, step = choice.rpartition(" @ step ")
            job = by_label.get(label)
            snapshot = job and job.output_dir / "eval" / f"step-{int(step):06d}"
            if not snapshot or not snapshot.is_dir():
                raise ConfigError(f"{choice}: no such kept checkpoint (train on this base model first)")
            picked.append((choice, job.output_dir, snapshot))
        return picked

    # -- layout ---------------------------------------------------------------------------------
    def blocks(self, delete_cache: tuple[int, int] | None = None):
        import gradio as gr

        with gr.Blocks(title="dreampeft", delete_cache=delete_cache) as demo:
            gr.Markdown("# dreampeft\nPersonalise SDXL with **LoRA**, **LoRA-Dash**, **FourierFT** or "
                        "**MoRA**: upload a subject, train, then compare methods side by side.")
            model = gr.Dropdown(list(PRESETS), value=self.model, allow_custom_value=True,
                                label="Base model (a preset, any hub id, or a local SDXL folder)", elem_id="model")
            with gr.Tab("1 · Subject and training"):
                train_inputs, train_btn, stop_btn, message = self._training_widgets(gr, model)
            with gr.Tab("2 · Generate and compare"):
                gen_inputs, gen_btn, gallery, scores, gen_message = self._generation_widgets(gr, model)
                pareto = gr.Image(label="Subject vs prompt fidelity, every evaluation of every run (★ exported, × base)",
                                  type="filepath", interactive=False, elem_id="pareto", height=360)
                strengths, study_btn, study_plot, study_table, study_message = strength_widgets(gr)
            with gr.Row():
                jobs = gr.Dataframe(headers=JOB_COLUMNS, label="Runs (one trains at a time; the rest wait)",
                                    interactive=False, elem_id="jobs")
            samples = gr.Gallery(label="Validation samples", columns=4, height=220, elem_id="samples")
            # live: redrawn as evaluations arrive; the exported step starred, and flagged in the table above
            curves = gr.Image(label="Fidelity along training", type="filepath", interactive=False,
                              elem_id="fidelity_plot")
            downloads = gr.File(label="Trained adapters (native + diffusers + model card)",
                                file_count="multiple", interactive=False, elem_id="downloads")
            train_btn.click(self.train, train_inputs, message)
            stop_btn.click(self.stop, None, message)
            gen_btn.click(self.generate, gen_inputs, [gallery, scores, gen_message])
            study_btn.click(self.strength_study, [*gen_inputs[:6], strengths, gen_inputs[-1]],
                            [study_plot, study_table, study_message])
            gr.Timer(1.0).tick(self.progress, None,
                               [jobs, samples, downloads, curves, pareto, gen_inputs[-1]])
            # resolution ×2, learning rates, method options (the trainer options keep what was set)
            preset_widgets = [train_inputs[6], gen_inputs[5], *train_inputs[9:len(train_inputs) - len(self.run_specs)]]
            model.change(lambda m: tuple("" if v is None else v for v in preset_defaults(m) or ())  # blank: default
                         or (gr.skip(),) * len(preset_widgets), model, preset_widgets)
        return demo

    def _training_widgets(self, gr, model):
        with gr.Row():
            files = gr.File(label="Subject images (1–50; " + " ".join(IMAGE_SUFFIXES) + ")",
                            file_count="multiple", file_types=list(IMAGE_SUFFIXES), elem_id="uploads")
            with gr.Column():
                prompt = gr.Textbox(label="Instance prompt", placeholder="a photo of sks dog", elem_id="prompt")
                class_word = gr.Textbox(label="Class (used when the prompt is blank)", value="object")
                methods = gr.CheckboxGroup(list(METHODS), value=["lora"], label="Methods", elem_id="methods")
        with gr.Row():
            steps = gr.Number(150, label="Steps", precision=0, minimum=1, elem_id="steps")
            resolution = gr.Number(self._defaults[0], label="Resolution", precision=0, minimum=8)
            seed = gr.Number(0, label="Seed", precision=0)
            every = gr.Number(0, label="Validate every N steps (0: at the end)", precision=0, minimum=0,
                              elem_id="validate_every")
        lrs, values = [], []
        with gr.Accordion("Method options", open=False):
            for method in METHODS:
                with gr.Row():
                    gr.Markdown(f"**{method}**")
                    lrs.append(gr.Number(self._defaults[2 + len(lrs)], label="learning rate"))
                    values += [self._control(gr, s, self._defaults[2 + len(METHODS) + i])
                               for i, s in enumerate(self.specs) if s.method == method]
        with gr.Accordion("Training options", open=False):
            run_values = [self._control(gr, s, s.default) for s in self.run_specs]
        with gr.Row():
            train_btn = gr.Button("Train", variant="primary", elem_id="train")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
        message = gr.Markdown(elem_id="train_message")
        inputs = [model, files, prompt, class_word, methods, steps, resolution, seed, every, *lrs, *values, *run_values]
        return inputs, train_btn, stop_btn, message

    @staticmethod
    def _control(gr, spec, value):
        if spec.kind == "bool" and spec.optional:  # None: the trainer decides from the data
            return gr.Radio(list(TRISTATE), value=next(k for k, v in TRISTATE.items() if v == value),
                            label=spec.name, info=spec.help)
        if spec.kind == "bool":
            return gr.Checkbox(value, label=spec.name, info=spec.help)
        if spec.kind == "choice":
            return gr.Dropdown(list(spec.choices), value=value, label=spec.name, info=spec.help)
        if spec.optional:  # a number box turns blank into 0 once shown: text, parsed by forms._number
            return gr.Textbox("" if value is None else str(value), label=spec.name + " (blank: default)",
                              info=spec.help)
        return gr.Number(value, label=spec.name, info=spec.help, precision=0 if spec.kind == "int" else None)

    def _generation_widgets(self, gr, model):
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="a sks object on a green background", elem_id="gen_prompt",
                                scale=3)
            seed = gr.Number(0, label="Seed", precision=0)
            n = gr.Slider(1, 8, value=2, step=1, label="Images per model")
        with gr.Row():
            steps = gr.Slider(1, 50, value=10, step=1, label="Denoising steps")
            resolution = gr.Number(self._defaults[0], label="Resolution", precision=0, minimum=8)
            scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Adapter scale", elem_id="scale")
        gen_btn = gr.Button("Generate side by side", variant="primary", elem_id="generate")
        gallery = gr.Gallery(label="Base model and each trained adapter (same prompt and seeds)", columns=4,
                             elem_id="gallery")
        scores = gr.Dataframe(headers=SCORE_COLUMNS, label="Subject fidelity (DINO, CLIP-I vs your images; "
                              "CLIP-T vs the prompt; toy_judge: the toy model's judge, DINO-style; toy_object: the chance it "
                              "reads your images' object; toy_prompt: the share of the size, corner and background asked "
                              "that it reads)", interactive=False, elem_id="scores")
        message = gr.Markdown(elem_id="gen_message")
        checkpoints = gr.Dropdown([], value=[], multiselect=True, elem_id="checkpoints",
                                  label="Also generate with kept checkpoints (each evaluated step of a finished run)")
        return [model, prompt, seed, n, steps, resolution, scale, checkpoints], gen_btn, gallery, scores, message
