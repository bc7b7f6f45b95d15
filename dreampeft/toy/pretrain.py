"""``python -m dreampeft.toy pretrain OUT``: train the toy SDXL's VAE and UNet on the toy world,
and the judge that scores it, on a CPU in about 45 minutes; save a diffusers folder.

Order: render a fixed set of world scenes → train the VAE on them plus objects in two-colour stripes
(``vae_set``; object pixels weighted up: see ``train_vae``), or reuse a saved one (``--vae``) →
encode every image once through the fp16 VAE (posterior mean and std) and set the VAE's
``scaling_factor`` from the latents' spread → encode every distinct caption once → train the UNet
together with the two text encoders (they start as the tiny random CLIP pair; DDPM noise schedule
rescaled to zero terminal SNR with v-prediction and min-SNR-5 weighting, 10% of captions dropped
to zero embeddings, which is what SDXL pipelines use for an empty negative prompt, so
classifier-free guidance works; optionally the loss weighted up on the object, ``object_weight``)
with an EMA of its weights → train the judge on scenes that
include the benchmark subjects → save (UNet, VAE and judge in fp16).

Why zero terminal SNR (Lin et al. 2024): with SD's schedule the last training step still leaks
~7% of the image, so the image's mean colour — here, the background — comes from the sampler's
initial noise and the prompt cannot choose it (the first run of this script drew seed-chosen
backgrounds whatever the prompt said, judge background accuracy 0.08). v-prediction keeps the
target defined at SNR 0; min-SNR weighting keeps the nearly clean steps from taking the small
budget (see ``train_unet`` for what it costs: position words).
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..toyworld import POSITIONS
from .data import latent_object_masks, object_masks, render_set, to_unit, vae_set
from .judge import judge_for
from .loss import FLOOR_DETAIL, floored_v_loss, optimizer_step, warmup_cosine
from .models import ATTENTION_16, build_toy_unet, build_toy_vae, toy_unet_shape

TIME_IDS = (64, 64, 0, 0, 64, 64)  # SDXL micro-conditioning: original size, crop, target size


@contextmanager
def autocast(mixed_precision: str):
    """Where ``mixed_precision`` is "bf16": convolutions and matmuls in bfloat16 (weights, EMA, Adam and
    the loss stay float32), attention through PyTorch's math kernel — the CPU flash kernel's bf16
    backward took 4× its float32 time (0.29 against 0.07 s a step), eating most of the gain. On a CPU
    with AVX-512 BF16 a shipped-recipe UNet step then takes ~0.7× its float32 time
    (``bench/toy_pretrain_precision.py``); without it bf16 is emulated, slower."""
    if mixed_precision != "bf16":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.MATH]):
        yield


def train_vae(pixels: torch.Tensor, masks: torch.Tensor, steps: int, batch: int, seed: int, log,
              object_weight: float = 10.0):
    """``masks`` from ``object_masks``; the loss weight is 1 + ``object_weight`` there. Objects cover
    ~10% of the pixels, and with a plain MSE the VAE spent its budget on backgrounds and decoded
    every shape as a blob (the judge read the object off 39% of reconstructions; 76% after 400
    steps with object weight 20, 97% after 1,000 with 10)."""
    vae = build_toy_vae(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched, gen = warmup_cosine(opt, steps), torch.Generator().manual_seed(seed)
    for step in range(steps):
        pick = torch.randint(len(pixels), (batch,), generator=gen)
        x, w = to_unit(pixels[pick]), 1 + object_weight * (masks[pick].float() / 255)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=gen)).sample
        # a light KL keeps the latents compact without blurring flat-coloured shapes
        loss = ((rec - x).pow(2) * w).mean() / w.mean() + 1e-6 * post.kl().mean()
        optimizer_step(opt, sched, loss)
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps} loss {loss.item():.5f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        post = vae.encode(to_unit(pixels[i:i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def tokenize_captions(tokenizers, captions: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Distinct captions tokenized once: (token ids per tokenizer, index of each caption)."""
    distinct = sorted(set(captions))
    ids = [tok(distinct, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in tokenizers]
    where = {c: i for i, c in enumerate(distinct)}
    return ids, torch.tensor([where[c] for c in captions])


def toy_scheduler():
    """The sampler the toy ships with; training uses DDPM on the same config."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, timestep_spacing="trailing",
                                  prediction_type="v_prediction", rescale_betas_zero_snr=True)


def train_unet(latents, text, start: list, c: "PretrainConfig", log, sample_fn=None, masks=None):
    """``start`` = [unet, encoder, encoder_2], trained jointly; returns their EMA copies. ``masks``
    (n, 1, 16, 16): each latent's object coverage, for ``c.object_weight``.

    The encoders start as the tiny random CLIP pair. Frozen, they left the UNet nearly blind to the
    prompt within this budget (attention over 77 barely distinct tokens learns slowly); trained
    with it, the words become distinct features the cross-attention can find."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from ..dreambooth.models import encode_prompts

    (mean, std), (ids, index) = latents, text
    steps, batch, seed = c.unet_steps, c.batch, c.seed
    models = torch.nn.ModuleList(start)
    models.train().requires_grad_(True)
    ema = copy.deepcopy(models).requires_grad_(False)
    noise_sched = DDPMScheduler.from_config(toy_scheduler().config)
    opt = torch.optim.AdamW(models.parameters(), lr=c.unet_lr, weight_decay=1e-4)
    sched, gen = warmup_cosine(opt, steps, warmup=100), torch.Generator().manual_seed(seed + 1)
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).repeat(batch, 1)
    for step in range(steps):
        pick = torch.randint(len(mean), (batch,), generator=gen)
        z0 = mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(c.min_timestep, 1000, (batch,), generator=gen)
        keep = (torch.rand(batch, generator=gen) >= 0.1).float()  # 10% unconditional
        with autocast(c.mixed_precision):
            h, p = encode_prompts(list(models[1:]), [x[index[pick]] for x in ids], "cpu")
            pred = models[0](noise_sched.add_noise(z0, noise, t), t, h * keep[:, None, None],
                             added_cond_kwargs={"text_embeds": p * keep[:, None], "time_ids": time_ids}).sample.float()
        snr = compute_snr(noise_sched, t)
        # Min-SNR-5 for v-prediction: caps the easy, nearly clean steps. Its v form also fades to 0
        # at snr 0 (the first sampling step, where the layout is decided), and the shipped model
        # ignores position words. Tried: the cap alone (weight 1 up to snr 4): the model then told
        # centre from corner (position 0.28 vs 0.13) but drew worse shapes (object 0.45 vs 0.62).
        floor = c.layout_floor if step < c.layout_share * steps else c.snr_floor
        loss = floored_v_loss(pred, noise_sched.get_velocity(z0, noise, t), snr, floor, c.floor_pool,
                              None if masks is None else masks[pick], c.object_weight,
                              background_detail=c.floor_detail == "background")
        optimizer_step(opt, sched, loss, models.parameters())
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, q in zip(ema.parameters(), models.parameters()):
                e.lerp_(q, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step + 1}/{steps} loss {loss.item():.4f}")
        if sample_fn is not None and ((step + 1) % c.eval_every == 0 or step == steps - 1):
            sample_fn(*ema, step + 1)
    return tuple(m.eval() for m in ema)


def _assemble(pipe, **replace):
    """A new pipeline from ``pipe``'s components with some replaced (the pipeline derives its VAE
    scale factor on construction, so swapping ``pipe.vae`` in place would keep the old one)."""
    from diffusers import StableDiffusionXLPipeline

    new = StableDiffusionXLPipeline(**{**pipe.components, **replace})
    new.set_progress_bar_config(disable=True)
    return new


def _load_vae(folder: str):
    from diffusers import AutoencoderKL

    sub = "vae" if (Path(folder) / "vae").is_dir() else None
    return AutoencoderKL.from_pretrained(folder, subfolder=sub).float().eval().requires_grad_(False)


@dataclass(frozen=True)
class PretrainConfig:
    """What ``python -m dreampeft.toy pretrain`` trains; every field is a CLI flag of the same name.
    The defaults built the shipped ``assets/toy_sdxl`` (pretrain_report.json records them)."""

    vae_steps: int = 1000
    unet_steps: int = 2000
    judge_steps: int = 1600
    judge_blur: float = 3.0  # each judge training image blurred by U(0, judge_blur) px (judge.py says why)
    judge_tiny: float = 0.0  # the share of the judge's small objects drawn at 0.45–0.75× small (judge_scenes)
    judge_orange: float = 0.0  # the share of the judge's plain shapes recoloured orange (judge.py says why)
    n_images: int = 12_000
    batch: int = 64
    seed: int = 0
    vae_striped: float = 0.5  # extra striped objects in the VAE's set, as a share of n_images (vae_set)
    snr_floor: float = 0.0  # min-SNR-5 weighs steps below this SNR as if at it; 0: plain min-SNR
    layout_share: float = 0.0  # the first share of UNet steps use layout_floor instead of snr_floor
    layout_floor: float = 1.0
    # UNet steps draw t from [min_timestep, 999] (kohya's --min_timestep): a second stage on the
    # noisiest steps alone, where the sampler's first steps decide the layout
    min_timestep: int = 0
    # the UNet's loss weight on latent pixels under the object is 1 + object_weight (0: plain MSE)
    object_weight: float = 0.0
    # where the UNet's scenes put the object when their caption names no position ("any": anywhere).
    # Trained on "any" with the SNR floor, the first sampling step predicts faint objects in every
    # corner for such prompts, and the sampler drew two to four of them.
    unnamed_position: str = "any"
    # the same for the VAE's scenes ("same": the UNet's). The shipped VAE (session 13) saw "any";
    # one-stage bases that trained theirs on "center" learn the striped ball less well (README)
    vae_unnamed_position: str = "same"
    # the floor's extra weight falls on the error of floor_pool × floor_pool latent means (layout,
    # not detail; 1: on every pixel's error, as min-SNR's own weight always does)
    floor_pool: int = 1
    # "background": the floor also pays for the detail of blocks the object does not touch (the
    # caption fixes a striped, checkered or dotted background's pattern; K = 4 means average it away)
    floor_detail: str = "none"
    unet_lr: float = 1e-3  # AdamW, for the UNet and both text encoders (warm-up, then cosine)
    attention_16: str = "none"  # attention at the 16×16 level too: none, up (last up block) or both
    unet_width: int = 1  # multiplies the UNet's channels (32, 64, 128); 2 costs ~2.7× per step
    eval_captions: int = 60  # full captions that prompt following is read on (curve and final report)
    eval_every: int = 500  # UNet steps between readings of the curve
    mixed_precision: str = "no"  # "bf16": the UNet's and text encoders' training steps under bf16 autocast
    vae: str = ""  # a toy model folder (or its vae/) whose VAE to reuse instead of training one
    # a toy model folder to continue from (its UNet, text encoders and, unless --vae says otherwise,
    # VAE; unet_width and attention_16 are then the folder's): a second stage with other settings
    init: str = ""

    def __post_init__(self):
        for name in ("vae_steps", "unet_steps", "judge_steps", "n_images", "batch", "eval_captions", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer (got {getattr(self, name)})")
        if not 0 <= self.judge_blur <= 8:
            raise ValueError(f"judge_blur is a Gaussian's standard deviation in pixels: 0 (off) to 8 (got {self.judge_blur})")
        for name in ("judge_tiny", "judge_orange"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a share of the judge's scenes in [0, 1] (got {getattr(self, name)})")
        if self.batch < 2:
            raise ValueError(f"batch must be at least 2: the VAE trains on batch // 2 (got {self.batch})")
        if not 0 <= self.vae_striped <= 1:
            raise ValueError(f"vae_striped is a share of n_images in [0, 1] (got {self.vae_striped})")
        for name in ("snr_floor", "layout_floor"):
            if not 0 <= getattr(self, name) <= 5:
                raise ValueError(f"{name} must lie in [0, 5], min-SNR's cap (got {getattr(self, name)})")
        if not 0 <= self.layout_share <= 1:
            raise ValueError(f"layout_share is a share of unet_steps in [0, 1] (got {self.layout_share})")
        for name, extra in (("unnamed_position", ()), ("vae_unnamed_position", ("same",))):
            if getattr(self, name) not in (*extra, "any", *POSITIONS):
                raise ValueError(f"{name} must be {', '.join((*extra, 'any'))} or one of {', '.join(POSITIONS)} "
                                 f"(got {getattr(self, name)!r})")
        if not 0 <= self.object_weight <= 100:
            raise ValueError(f"object_weight must lie in [0, 100] (got {self.object_weight})")
        if not 0 <= self.min_timestep <= 998:
            raise ValueError(f"min_timestep must lie in [0, 998] of the 1,000-step schedule (got {self.min_timestep})")
        if self.floor_pool not in (1, 2, 4, 8, 16):
            raise ValueError(f"floor_pool must divide the 16-pixel latent side: 1, 2, 4, 8 or 16 (got {self.floor_pool})")
        if self.floor_detail not in FLOOR_DETAIL:
            raise ValueError(f"floor_detail must be one of {', '.join(FLOOR_DETAIL)} (got {self.floor_detail!r})")
        if self.floor_detail != "none" and self.floor_pool == 1:
            raise ValueError("floor_detail needs --floor_pool 2 or more: at 1 the floor already weighs every pixel's error")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be no or bf16 (got {self.mixed_precision!r})")
        if not 0 < self.unet_lr < 1:
            raise ValueError(f"unet_lr must lie in (0, 1) (got {self.unet_lr})")
        if not 1 <= self.unet_width <= 4:
            raise ValueError(f"unet_width multiplies the UNet's channels: 1 to 4 (got {self.unet_width})")
        if self.attention_16 not in ATTENTION_16:
            raise ValueError(f"attention_16 must be one of {', '.join(ATTENTION_16)} (got {self.attention_16!r})")
        if self.vae and not (Path(self.vae) / "config.json").exists() and not (Path(self.vae) / "vae").is_dir():
            raise ValueError(f"vae: {self.vae} holds no VAE (want a toy model folder or its vae/ subfolder)")
        if self.init and not all((Path(self.init) / sub / "config.json").exists()
                                 for sub in ("unet", "text_encoder", "text_encoder_2", "vae")):
            raise ValueError(f"init: {self.init} is not a toy model folder (want unet/, text_encoder/, "
                             "text_encoder_2/ and vae/, as pretrain writes them)")
        if self.init and (self.unet_width, self.attention_16) != (1, "none"):
            raise ValueError("init: the UNet's architecture is the folder's; drop unet_width and attention_16")


def vae_data(c: PretrainConfig, scenes: list, pixels: torch.Tensor) -> tuple[list, torch.Tensor]:
    """The scenes a new VAE trains on: the UNet's (or the world's with ``vae_unnamed_position``) plus
    the striped extras; with ``--vae`` only the UNet's, for the latent statistics."""
    if c.vae:
        return scenes, pixels
    if c.vae_unnamed_position not in ("same", c.unnamed_position):
        scenes, pixels = render_set(c.seed, c.n_images, unnamed_position=c.vae_unnamed_position)
    return vae_set(scenes, pixels, c.seed, c.vae_striped)


def _forget_origin(out: Path) -> None:
    """diffusers saves the folder a component came from (``_name_or_path``) in its config: after
    ``--init`` the earlier stage's temporary folder, meaningless to whoever loads this one."""
    for path in out.glob("*/config.json"):
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def pretrain(out: str | Path, config: PretrainConfig = PretrainConfig(), log=print) -> Path:
    """Everything above, end to end; returns ``out`` (a StableDiffusionXLPipeline folder)."""
    from ..tiny import build_tiny_sdxl
    from .evaluate import prompt_following, sample_grid

    c = replace(config, vae=config.init) if config.init and not config.vae else config  # a second stage's VAE
    seed, batch = c.seed, c.batch
    out, t0, timings = Path(out), time.perf_counter(), {}
    out.mkdir(parents=True, exist_ok=True)
    pipe = _assemble(build_tiny_sdxl(seed), scheduler=toy_scheduler())  # the tiny random CLIP pair
    scenes, pixels = render_set(seed, c.n_images, unnamed_position=c.unnamed_position)
    vae_scenes, vae_pixels = vae_data(c, scenes, pixels)
    log(f"rendered {len(vae_scenes)} scenes in {time.perf_counter() - t0:.0f} s")

    t = time.perf_counter()
    vae = _load_vae(c.vae) if c.vae else train_vae(vae_pixels, object_masks(vae_scenes), c.vae_steps,
                                                    batch // 2, seed, log)
    # the UNet learns the latents of the VAE that ships, in fp16; and so `--vae` of a saved toy
    # model trains exactly the UNet that a full run would
    vae = vae.half().float()
    del vae_pixels
    pipe = _assemble(pipe, vae=vae)
    timings["vae_s"] = time.perf_counter() - t
    mean, std = encode_latents(vae, pixels)
    draw = torch.randn(std.shape, generator=torch.Generator().manual_seed(seed))
    scale = float(1 / (mean + std * draw).std())
    vae.register_to_config(scaling_factor=scale)
    mean, std = mean * scale, std * scale
    text = tokenize_captions([pipe.tokenizer, pipe.tokenizer_2], [s.caption() for s in scenes])
    log(f"latents scaled by {scale:.4f}; {len(text[0][0])} distinct captions")

    # the judge first (it does not depend on the UNet), so that prompt following is read along training
    t = time.perf_counter()
    judge = judge_for(c, log)
    timings["judge_s"] = time.perf_counter() - t
    curve = []

    def snapshot(unet, te1, te2, step):
        snap = _assemble(pipe, unet=unet, text_encoder=te1, text_encoder_2=te2)
        if step < c.unet_steps:  # to watch a run; the last step's grid is samples.png
            sample_grid(snap).save(out / f"samples-step{step}.png")
        curve.append({"step": step, **prompt_following(snap, judge, n=c.eval_captions)})
        log(f"prompt following at step {step}: {curve[-1]}")

    t = time.perf_counter()
    if c.init:  # a second stage: the folder's UNet and encoders (float32)
        from ..single_file import load_pipeline

        before = load_pipeline(c.init)
        start = [before.unet, before.text_encoder, before.text_encoder_2]
    else:  # the tiny random CLIP pair, and a UNet drawn from the seed
        start = [build_toy_unet(seed, c.attention_16, c.unet_width), pipe.text_encoder, pipe.text_encoder_2]
    need_masks = c.object_weight or c.floor_detail == "background"
    masks = latent_object_masks(scenes).half() if need_masks else None
    unet, te1, te2 = train_unet((mean, std), text, start, c, log, snapshot, masks)
    pipe = _assemble(pipe, unet=unet, text_encoder=te1.requires_grad_(False), text_encoder_2=te2.requires_grad_(False))
    timings["unet_s"] = time.perf_counter() - t  # with the snapshots' samples and prompt following
    for f in out.glob("samples-step*.png"):
        f.unlink()
    # UNet, VAE and judge in fp16 (half the bytes in the repository; they load as float32). The
    # text encoders stay float32: transformers would load fp16 ones as fp16.
    pipe.unet.half(), pipe.vae.half()
    pipe.save_pretrained(out)
    _forget_origin(out)
    save_file({k: v.half().contiguous() for k, v in judge.state_dict().items()}, out / "judge.safetensors")
    report = {**asdict(c), "scaling_factor": scale, **{k: round(v, 1) for k, v in timings.items()},
              "total_s": round(time.perf_counter() - t0, 1), "curve": curve}
    report["unet_width"], report["attention_16"] = toy_unet_shape(pipe.unet)  # --init: the folder's, not the flags'
    pipe.unet.float(), pipe.vae.float()
    report["prompt_following"] = prompt_following(pipe, judge.float(), n=c.eval_captions)
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=1) + "\n")
    sample_grid(pipe).save(out / "samples.png")
    log(json.dumps(report))
    return out
