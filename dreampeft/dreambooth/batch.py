"""One micro-batch: its views, latents, prompt embeddings and loss.

Everything random in micro-batch m is drawn from ``generator(seed, m, rank)`` in a fixed order
(flip, crop, caption dropout, then the caption's tag shuffle and tag dropout per example; then noise,
offset, timesteps), so a resumed run draws
exactly what the uninterrupted run drew. An option that is off draws nothing, so turning a new
option on never changes what the runs without it compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import generator
from .models import encode_prompts, tokenize
from .views import augment

INSTANCE, CLASS, FRESH = 0, 1, 2  # integer tags: view keys must hash the same in every process


@torch.no_grad()
def encode_view(run, pixels: torch.Tensor, key: tuple[int, ...], cache: bool) -> torch.Tensor:
    """VAE latent of one view. The posterior sample is drawn from a generator keyed by the view,
    so a cached latent is exactly what encoding again would give."""
    if cache and key in run.latents:
        return run.latents[key]
    vae = run.parts.vae
    dist = vae.encode(pixels[None].to(run.device, vae.dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator(run.cfg.seed, 11, *key)).to(run.device)
    latent = (dist.mean + dist.std * noise) * vae.config.scaling_factor
    if cache:
        run.latents[key] = latent
    return latent


def batch_inputs(run, micro: int, g: torch.Generator) -> dict:
    """Latents, prompt embeddings, pooled embeddings, time ids and loss weights of one micro-batch
    (instance examples first, then their class examples)."""
    cfg, mb = run.cfg, run.plan.micro_batch(micro, run.acc.process_index)
    chosen = [(INSTANCE, i, run.instance[i]) for i, _ in mb.pairs]
    chosen += [(CLASS, c, run.klass[c]) for _, c in mb.pairs if c is not None]
    latents, time_ids, prompts, masks = [], [], [], []
    for role, idx, ex in chosen:
        flip = cfg.random_flip and bool(torch.rand(1, generator=g) < 0.5)
        view = augment(ex.image, mb.size, cfg.center_crop, flip, g, ex.mask if cfg.masked_loss else None)
        if view.key is not None:  # deterministic view: encoded once, then cached
            latents.append(encode_view(run, view.pixels, (role, idx, *view.key), cache=True))
        else:  # a random crop is a fresh view every time
            latents.append(encode_view(run, view.pixels, (FRESH, role, idx, micro), cache=False))
        time_ids.append(view.time_ids)
        dropped = cfg.caption_dropout_rate > 0 and bool(torch.rand(1, generator=g) < cfg.caption_dropout_rate)
        prompts.append(None if dropped else caption_tags(ex.prompt, cfg, g))
        masks.append(view.mask)
    latents = torch.cat(latents)
    embeds, pooled = prompt_embeddings(run, prompts)
    return {"latents": latents, "embeds": embeds, "pooled": pooled,
            "time_ids": torch.stack(time_ids).to(run.device),
            "weights": loss_weights(masks, latents.shape[-2:], cfg.mask_background_weight, run.device)}


def caption_tags(caption: str, cfg, g: torch.Generator) -> str:
    """kohya's caption tags: the comma-separated parts after the first ``keep_tokens`` shuffled
    (``shuffle_caption``) and each left out with probability ``caption_tag_dropout_rate``, drawn from
    ``g``. With both off the caption is returned as written and nothing is drawn."""
    if not (cfg.shuffle_caption or cfg.caption_tag_dropout_rate):
        return caption
    parts = [p.strip() for p in caption.split(",")]
    head, tags = parts[:cfg.keep_tokens], parts[cfg.keep_tokens:]
    if cfg.shuffle_caption:
        tags = [tags[i] for i in torch.randperm(len(tags), generator=g).tolist()]
    if cfg.caption_tag_dropout_rate:
        kept = (torch.rand(len(tags), generator=g) >= cfg.caption_tag_dropout_rate).tolist()
        tags = [t for t, k in zip(tags, kept) if k]
    return ", ".join(p for p in head + tags if p)


def loss_weights(masks: list, latent_hw, background: float, device) -> torch.Tensor | None:
    """Per-latent-pixel loss weights (N, 1, h, w): each pixel mask averaged over its latent cell,
    then background + (1 - background)·mask. None when no example of the batch has a mask."""
    if all(m is None for m in masks):
        return None
    cells = []
    for m in masks:
        if m is None:
            cells.append(torch.ones(1, *latent_hw))
        else:
            cells.append(F.adaptive_avg_pool2d(m, tuple(latent_hw)))  # exact cell means: sizes divide
    return (background + (1.0 - background) * torch.stack(cells)).to(device)


def prompt_embeddings(run, prompts: list[str | None]):
    """SDXL's conditioning of each prompt; a dropped caption (None) is SDXL's unconditional: zero
    embeddings where the pipeline forces zeros for the empty prompt (SDXL base), else ''."""
    zeros = run.parts.force_zeros_for_empty_prompt
    text = [("" if p is None else p) for p in prompts]
    if run.cfg.train_text_encoder and not run.text_encoders_done:
        encoders = [run.trained["text_encoder"], run.trained["text_encoder_2"]]
        embeds, pooled = encode_prompts(encoders, tokenize(run.parts, text), run.device)
    else:  # frozen (or finished) encoders: each prompt is encoded once
        encoders = ([run.unwrapped()[n] for n in ("text_encoder", "text_encoder_2")]
                    if run.cfg.train_text_encoder else run.parts.text_encoders)
        for p in set(text) - run.prompts.keys():
            with torch.no_grad():
                run.prompts[p] = encode_prompts(encoders, tokenize(run.parts, [p]), run.device)
        embeds, pooled = (torch.cat(t) for t in zip(*(run.prompts[p] for p in text)))
    if zeros and None in prompts:
        keep = torch.tensor([p is not None for p in prompts], device=run.device, dtype=embeds.dtype)
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
    return embeds, pooled


def compute_loss(run, micro: int) -> torch.Tensor:
    cfg, sched = run.cfg, run.parts.noise_scheduler
    g = generator(cfg.seed, micro, run.acc.process_index)
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))  # adapter dropout, exactly
    b = batch_inputs(run, micro, g)
    latents = b["latents"]
    noise = torch.randn(latents.shape, generator=g)
    if cfg.noise_offset:
        noise += cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=g)
    noise = noise.to(run.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=g).to(run.device)
    noisy = sched.add_noise(latents, noise, t)
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    unet_dtype = run.parts.unet.dtype
    with run.acc.autocast():
        pred = run.trained["unet"](noisy.to(unet_dtype), t, b["embeds"].to(unet_dtype), added_cond_kwargs={
            "text_embeds": b["pooled"].to(unet_dtype), "time_ids": b["time_ids"].to(unet_dtype)}).sample
    per_example = masked_mse(pred.float(), target.float(), b["weights"])
    if cfg.snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(sched, t)  # min-SNR-γ (Hang et al. 2023), as diffusers weights it
        denominator = snr if sched.config.prediction_type == "epsilon" else snr + 1
        per_example = per_example * torch.clamp(snr, max=cfg.snr_gamma) / denominator
    if not run.klass:
        return per_example.mean()
    inst, prior = per_example.chunk(2)
    return inst.mean() + cfg.prior_loss_weight * prior.mean()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-example mean squared error; with weights, the weighted mean Σ w·e² / Σ w over each
    example's pixels, so a small subject is not a small loss. A pixel of weight 0 gives exactly no
    gradient."""
    se = F.mse_loss(pred, target, reduction="none")
    if weights is None:
        return se.mean(dim=(1, 2, 3))
    w = weights.expand_as(se)
    return (se * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3))
