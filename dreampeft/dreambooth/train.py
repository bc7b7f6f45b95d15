"""The DreamBooth training loop for SDXL, through accelerate (1 or N processes, CPU or GPU).

Read ``train`` top to bottom: set up, maybe resume, then per optimizer step: accumulate
micro-batches, clip, step, LoRA-Dash launch check, events, checkpoint, validation; at the end
save the adapters. Everything random in step k is drawn from generators keyed by (seed, k, rank),
so a resumed run continues exactly where the interrupted one was.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import inject
from ..adapters import dash_step
from ..adapters.svd_prefetch import SVDPrefetch
from ..state import WEIGHTS_NAME
from . import rundir, stop
from .checkpoint import last_checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import DreamBoothConfig
from .batch import compute_loss
from .data import DreamBoothError, Example, attach_masks, generator, scan_folder
from .ema import AdapterEMA
from .fidelity import Evaluator, History
from .events import EventLog, open_events
from .finish import TrainResult, final_save, make_result, rank_checksums
from .optim import OPTIMIZERS
from .models import SDXLParts, build_pipeline, load_parts
from .prior import generate_class_images
from .trackers import Trackers, accelerator_kwargs
from .stop import RunStopped
from .views import BatchPlan, bucket_groups


@dataclass
class Run:
    cfg: DreamBoothConfig
    acc: object
    parts: SDXLParts
    trained: dict  # component name → prepared (maybe DDP-wrapped) module with adapters
    optimizer: object = None
    lr_scheduler: object = None
    instance: list[Example] = field(default_factory=list)
    klass: list[Example] = field(default_factory=list)
    plan: BatchPlan = None
    total_steps: int = 0
    latents: dict = field(default_factory=dict)  # cache of deterministic views
    prompts: dict = field(default_factory=dict)  # cache of frozen-encoder embeddings
    images: list = field(default_factory=list)  # the latest validation images
    validated_at: int | None = None  # and their step
    step_done: int = 0  # optimizer steps completed (resumed ones included)
    ema: AdapterEMA | None = None
    text_encoders_done: bool = False  # --train_text_encoder_frac reached: their adapters are fixed
    buckets: list = field(default_factory=list)  # the sizes in use (one: square at --resolution)
    trackers: Trackers | None = None
    evaluator: Evaluator | None = None  # --eval_steps, on the main process
    exported: tuple = (None, "")  # (step, why) of the weights the final files hold

    @property
    def device(self):
        return self.acc.device

    def unwrapped(self) -> dict:
        return {name: self.acc.unwrap_model(m) for name, m in self.trained.items()}

    def pipeline(self):
        """An SDXL pipeline on the run's own models (trained adapters in; frozen parts shared)."""
        models = self.unwrapped()
        encoders = [models.get("text_encoder", self.parts.text_encoders[0]),
                    models.get("text_encoder_2", self.parts.text_encoders[1])]
        return build_pipeline(self.cfg, self.parts, unet=models["unet"], text_encoders=encoders)

    def averaged(self):
        """Inside the block the adapters hold the EMA weights when --use_ema is on."""
        return self.ema.swapped(self.unwrapped()) if self.ema else contextlib.nullcontext()

    @property
    def text_encoder_stop(self) -> int:
        """The step from which text-encoder adapters are fixed (--train_text_encoder_frac)."""
        return math.ceil(self.cfg.train_text_encoder_frac * self.total_steps)


def make_accelerator(cfg: DreamBoothConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise DreamBoothError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
    # hidden_states[-2] leaves the last CLIP layer's adapters without gradient: DDP must know
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.train_text_encoder)
    # accelerate keeps one AcceleratorState per process; a second train() in the same process
    # (the demo, comparisons) may want another precision. The process group (PartialState) stays.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[ddp], **accelerator_kwargs(cfg))


def setup(cfg: DreamBoothConfig, acc, events: EventLog | None = None) -> Run:
    from diffusers.optimization import get_scheduler

    instance = scan_folder(cfg.instance_data_dir, cfg.instance_prompt, "--instance_data_dir")
    if cfg.masked_loss:
        unmasked = attach_masks(instance, cfg.mask_dir)
        if unmasked and acc.is_main_process:
            print(f"note: --masked_loss: {len(unmasked)} image(s) have no mask and weigh every pixel: "
                  f"{', '.join(p.name for p in unmasked[:5])}", file=sys.stderr)
    parts = load_parts(cfg)
    klass = []
    if cfg.with_prior_preservation:
        if acc.is_main_process:
            def report(done: int, total: int) -> None:  # before "start": the app shows it while no step has run
                if events is not None:
                    events.emit("class_images", done=done, total=total)

            generate_class_images(cfg, build_pipeline(cfg, parts), acc.device, progress=report)
        acc.wait_for_everyone()
        klass = scan_folder(cfg.class_data_dir, cfg.class_prompt, "--class_data_dir")[: cfg.num_class_images]
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    parts.vae.to(acc.device)  # the VAE stays float32: SDXL's VAE overflows in fp16
    trained = {"unet": parts.unet}
    parts.unet.to(acc.device, dtype)  # cast before injection: adapters are created in float32
    _inject(cfg, parts.unet, "unet")
    for name, enc in zip(("text_encoder", "text_encoder_2"), parts.text_encoders):
        enc.to(acc.device, dtype)
        if cfg.train_text_encoder:
            _inject(cfg, enc, name)
            trained[name] = enc
    # from_pretrained returns eval-mode models. Set each mode: what trains runs in train mode (adapter
    # dropout on; transformers checkpoints only in training mode), the frozen rest in eval mode.
    for m in (parts.vae, *parts.text_encoders):
        m.eval()
    for m in trained.values():
        m.train()
    if cfg.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        for name in trained.keys() - {"unet"}:
            trained[name].gradient_checkpointing_enable()
    groups = [{"params": list(inject.adapter_parameters(m)),
               "lr": cfg.learning_rate if name == "unet" else (cfg.text_encoder_lr or cfg.learning_rate)}
              for name, m in trained.items()]
    run = Run(cfg, acc, parts, trained, instance=instance, klass=klass)
    by_size = bucket_groups(cfg, [ex.image.size for ex in instance], parts.pixel_stride)
    run.buckets = sorted(by_size)
    run.plan = BatchPlan(by_size, len(klass), cfg.train_batch_size, acc.num_processes, cfg.seed, cfg.repeats)
    per_epoch = math.ceil(run.plan.micro_batches_per_epoch / cfg.gradient_accumulation_steps)
    run.total_steps = cfg.max_train_steps or cfg.num_train_epochs * per_epoch
    optimizer = OPTIMIZERS[cfg.optimizer](cfg, groups)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                              num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=run.total_steps)
    names = list(trained)
    prepared = acc.prepare(*[trained[n] for n in names], optimizer, scheduler)
    run.trained = dict(zip(names, prepared[: len(names)]))
    run.optimizer, run.lr_scheduler = prepared[len(names):]
    if cfg.use_ema:
        run.ema = AdapterEMA(run.unwrapped(), cfg.ema_decay)
    if cfg.eval_every and acc.is_main_process:
        run.evaluator = Evaluator(run)  # metric models load once, here
    return run


def _inject(cfg: DreamBoothConfig, model, component: str) -> None:
    # Adapter init (LoRA's A, FourierFT's spectrum) draws from the global RNG: seed it per
    # component, so two runs with one seed start from the same adapters.
    torch.manual_seed(generator(cfg.seed, 5, COMPONENTS.index(component)).initial_seed())
    try:
        inject.inject_adapters(model, cfg.adapter_config(component))
    except (ValueError, TypeError) as exc:
        flag = "--unet_target_modules" if component == "unet" else "--text_encoder_target_modules"
        raise DreamBoothError(f"{flag}: {exc}") from None


COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _rng_devices(run: Run) -> list:
    return [run.device] if run.device.type == "cuda" else []


def train_step(run: Run, step: int) -> tuple[float, float]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the mean loss
    and the gradient norm before clipping."""
    accum, total = run.cfg.gradient_accumulation_steps, torch.zeros((), device=run.device)
    for k in range(accum):
        with contextlib.ExitStack() as stack:
            if k < accum - 1:  # gradients are all-reduced once, on the last micro-batch
                for m in run.trained.values():
                    stack.enter_context(run.acc.no_sync(m))
            # compute_loss seeds the global RNG (adapter dropout); it gets its state back after
            stack.enter_context(torch.random.fork_rng(devices=_rng_devices(run)))
            loss = compute_loss(run, step * accum + k)
            run.acc.backward(loss / accum)
        total += loss.detach() / accum
    params = [p for group in run.optimizer.param_groups for p in group["params"] if p.grad is not None]
    if run.cfg.max_grad_norm > 0:
        norm = run.acc.clip_grad_norm_(params, run.cfg.max_grad_norm)
    else:  # gradients are all-reduced already: every process measures the same norm
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.unwrapped())
    return run.acc.reduce(total, reduction="mean").item(), float(norm)  # the loss of all processes


@torch.no_grad()
def validate(run: Run, step: int, events: EventLog) -> list[str]:
    cfg, models, pipe = run.cfg, run.unwrapped(), run.pipeline()
    out = Path(cfg.output_dir) / "validation"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(cfg.num_validation_images):  # EMA weights with --use_ema; no adapter dropout
        with run.averaged(), run.acc.autocast(), inject.eval_mode(*models.values()):
            image = pipe(cfg.validation_prompt, num_inference_steps=cfg.inference_steps,
                         height=cfg.resolution, width=cfg.resolution,
                         generator=torch.Generator().manual_seed(cfg.seed + i)).images[0]
        path = out / f"step-{step:06d}-{i}.png"
        image.save(path)
        paths.append(str(path))
    events.emit("validation", step=step, images=paths, prompt=cfg.validation_prompt)
    if run.trackers:
        run.trackers.images(paths, step, cfg.validation_prompt)
    run.images, run.validated_at = paths, step
    return paths


def _checkpoint(run: Run, step: int, events: EventLog) -> None:
    run.acc.wait_for_everyone()
    if run.acc.is_main_process:
        path = save_checkpoint(Path(run.cfg.output_dir), step, run.unwrapped(), run.optimizer,
                               run.lr_scheduler, run.acc.scaler, json.dumps(run.cfg.to_dict(), indent=2),
                               run.cfg.checkpoints_total_limit,
                               extra_state=_extra_state(run))
        events.emit("checkpoint", step=step, path=str(path))
    run.acc.wait_for_everyone()


def _extra_state(run: Run) -> dict:
    return {**({"ema": run.ema.state_dict()} if run.ema else {}),
            **({"fidelity": run.evaluator.history.state_dict()} if run.evaluator else {})}


def evaluate(run: Run, step: int, events: EventLog) -> None:
    row = run.evaluator.evaluate(run, step)
    events.emit("eval", **row)
    run.trackers.log({f"fidelity/{k}": v for k, v in row.items() if k != "step"}, step)


def _resume(run: Run) -> int:
    cfg, out = run.cfg, Path(run.cfg.output_dir)
    if not cfg.resume_from_checkpoint:
        return 0
    path = resolve_checkpoint(out, cfg.resume_from_checkpoint)
    if path is None:
        if (out / WEIGHTS_NAME).exists():
            raise DreamBoothError(f"--resume_from_checkpoint latest: {out} holds a finished run and no "
                                  "checkpoint to continue from; pass --overwrite_output_dir to train anew")
        if run.acc.is_main_process:
            print(f"note: --resume_from_checkpoint latest: no checkpoint in {out} yet; starting at step 0",
                  file=sys.stderr)
        return 0
    rundir.check_resume_config(path, cfg.to_dict())
    step, extra = load_checkpoint(path, run.unwrapped(), run.optimizer, run.lr_scheduler, run.acc.scaler)
    if run.ema is not None:
        try:
            run.ema.load_state_dict(extra["ema"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DreamBoothError(f"{path}: the checkpoint holds no usable EMA state ({exc}); resume from "
                                  "another checkpoint or start over with --overwrite_output_dir") from None
    if run.evaluator is not None and "fidelity" in extra:  # the evaluations so far, exactly
        run.evaluator.history = History.from_state(extra["fidelity"])
    return step


def _due(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


def train(cfg: DreamBoothConfig) -> TrainResult:
    """Run DreamBooth; returns where everything went and what the run cost."""
    out = Path(cfg.output_dir)
    acc = make_accelerator(cfg)
    events = open_events(cfg.events, enabled=acc.is_main_process)
    lock, run = None, None
    # restored when the run ends
    previous = stop.install() if threading.current_thread() is threading.main_thread() else {}
    try:
        if acc.is_main_process:
            lock = rundir.claim(out, cfg.overwrite_output_dir, bool(cfg.resume_from_checkpoint))
        run = setup(cfg, acc, events)
        run.trackers = Trackers(cfg, acc)
        run.step_done = _resume(run)
        events.emit("start", total_steps=run.total_steps, start_step=run.step_done, adapter=cfg.adapter,
                    trainable=sum(inject.trainable_parameter_count(m) for m in run.unwrapped().values()),
                    processes=acc.num_processes, buckets=[list(b) for b in run.buckets])
        if run.evaluator and run.step_done == 0 and run.evaluator.due(0, run.total_steps):
            evaluate(run, 0, events)  # the base model: the reference of every later evaluation
        step_seconds = _loop(run, run.step_done, events)
        checksums = rank_checksums(run)
        result = None
        if acc.is_main_process:
            images = run.images if run.validated_at == run.total_steps else (
                validate(run, run.total_steps, events) if cfg.validation_prompt else [])
            report = final_save(run, images)
            result = make_result(run, images, report, step_seconds, checksums)
            events.emit("done", output_dir=str(out), adapter=str(result.adapter), images=images,
                        diffusers=str(result.diffusers), export_rel_error=result.export_rel_error,
                        export_energy_kept={c: round(1 - e ** 2, 6) for c, e in result.export_rel_error.items()},
                        step_seconds_median=_median(step_seconds), step_seconds_max=max(step_seconds, default=None),
                        rank_checksums=checksums, peak_memory_mb=round(result.peak_memory_mb, 1),
                        **result.fidelity_summary())
        acc.wait_for_everyone()
        return result
    except (KeyboardInterrupt, RunStopped) as exc:
        events.emit("stopped", reason=str(exc) or "KeyboardInterrupt", step=run and run.step_done,
                    checkpoint=last_checkpoint(out))
        raise
    except OSError as exc:  # disk full, permissions changed mid-run: say where, keep what is saved
        err = DreamBoothError(f"{exc.filename or out}: {exc.strerror or exc}; the last complete checkpoint "
                              f"is {last_checkpoint(out)}: fix it and resume with --resume_from_checkpoint latest")
        events.emit("error", message=str(err), kind="OSError")
        raise err from None
    except Exception as exc:
        events.emit("error", message=str(exc), kind=type(exc).__name__)
        raise
    finally:
        if run is not None and run.trackers:
            run.trackers.end()
        events.close()
        if lock is not None:
            lock.close()
        stop.restore(previous)


def _loop(run: Run, start: int, events: EventLog) -> list[float]:
    from tqdm.auto import tqdm

    cfg, acc, seconds = run.cfg, run.acc, []
    bar = tqdm(total=run.total_steps, initial=start, disable=not acc.is_main_process, desc="train")
    prefetch = (SVDPrefetch.start(run.unwrapped().values(), cfg.dash_svd_cache, run.total_steps)
                if cfg.dash_svd_prefetch else None)
    with bar, prefetch or contextlib.nullcontext():  # the bar is closed before any error line is printed
        for step in range(start, run.total_steps):
            stop.raise_if_asked()
            if cfg.train_text_encoder and step >= run.text_encoder_stop and not run.text_encoders_done:
                fix_text_encoders(run)
            t0 = time.perf_counter()
            loss, grad_norm = train_step(run, step)
            seconds.append(time.perf_counter() - t0)
            done = run.step_done = step + 1
            launch = _dash_launch(run, done, prefetch)
            lr = run.lr_scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            bar.update()
            events.emit("step", step=done, loss=loss, lr=lr, grad_norm=grad_norm, seconds=round(seconds[-1], 4),
                        **launch)
            run.trackers.log({"loss": loss, "lr": lr, "grad_norm": grad_norm, "step_seconds": seconds[-1]}, done)
            if run.evaluator and run.evaluator.due(done, run.total_steps):
                evaluate(run, done, events)
            if _due(cfg.checkpointing_steps, done) and done < run.total_steps:
                _checkpoint(run, done, events)
            if cfg.validation_prompt and _due(cfg.validation_steps, done) and acc.is_main_process:
                validate(run, done, events)
    return seconds


def _dash_launch(run: Run, done: int, prefetch: SVDPrefetch | None) -> dict:
    """Launch the LoRA-Dash layers whose warm-up has ended; what the step event reports of it."""
    t0 = time.perf_counter()
    launched = [n for m in run.unwrapped().values() for n in dash_step(m, done, run.cfg.dash_svd_cache, prefetch)]
    if not launched:
        return {}
    return {"dash_launched": len(launched), "dash_launch_seconds": round(time.perf_counter() - t0, 3),
            "dash_svd_prefetched": prefetch.completed if prefetch else 0}


def fix_text_encoders(run: Run) -> None:
    """--train_text_encoder_frac reached: the text-encoder adapters keep their weights from here on
    (no gradient, so the optimizer skips them; eval mode, no dropout) and prompt embeddings are cached."""
    for name in ("text_encoder", "text_encoder_2"):
        run.unwrapped()[name].eval()
    run.text_encoders_done = True
    run.prompts.clear()


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
