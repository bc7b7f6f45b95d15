"""The toy UNet's pretraining loss: v-prediction error weighted by timestep (min-SNR-5 and the SNR
floor) and by where the object is; and the warm-up + cosine schedule and update step that every
pretraining stage (VAE, UNet, judge) uses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def object_weighted_mse(err: torch.Tensor, masks: torch.Tensor | None, weight: float) -> torch.Tensor:
    """Per-example mean of ``err`` (n, c, h, w) with pixels under the object (``masks`` (n, 1, h, w),
    coverage in [0, 1]) weighted 1 + ``weight``, normalised so that an even error reads the same
    as plain MSE: as in ``train_vae``, objects are ~10% of the latent and all of a subject."""
    if masks is None or weight == 0:
        return err.mean((1, 2, 3))
    w = 1 + weight * masks.float()
    return (err * w).sum((1, 2, 3)) / (w.sum((1, 2, 3)) * err.shape[1])


FLOOR_DETAIL = ("none", "background")  # what detail the floor's extra weight keeps beside the block means


def block_detail(err: torch.Tensor, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``err`` split into its ``pool`` × ``pool`` block means and what they average away (the detail,
    same shape as ``err``): per pixel, a block's mean square is its mean's square plus its detail's."""
    coarse = F.avg_pool2d(err, pool)
    return coarse, err - F.interpolate(coarse, scale_factor=pool)


def untouched_blocks(masks: torch.Tensor, pool: int) -> torch.Tensor:
    """1 on the latent pixels of the ``pool`` × ``pool`` blocks where ``masks`` (n, 1, h, w object
    coverage) is 0 everywhere, else 0."""
    return F.interpolate((F.max_pool2d(masks.float(), pool) == 0).float(), scale_factor=pool)


def floored_v_loss(pred, target, snr, floor: float, pool: int = 1, masks=None, object_weight: float = 0.0,
                   background_detail: bool = False):
    """The UNet's loss: min-SNR-5's v weight ``min(snr, 5) / (snr + 1)`` on every pixel's error, plus
    what the SNR floor adds at the noisiest steps (``max(snr, floor)``'s excess) on the error of
    ``pool`` × ``pool`` latent means. At t → 1000 the v target is −x0 from the caption alone: its
    layout (corner, background) is predictable, its detail (edges, the VAE's sampled noise) hardly,
    and detail is most of the error there (63–79% at t ≥ 800 on a width-2 base trained with floor
    0.1: ``bench/toy_noisy_loss.py``).

    ``background_detail``: the floor's excess also falls on the detail of the blocks that ``masks``
    (object coverage, needed then) leaves untouched. A background's pattern is fixed by its word
    (period 4 latent pixels: 4 × 4 means erase it, and a base trained so drew patterns at 0.63);
    the object's outline is not. With no object anywhere this is the unpooled loss."""
    weight = snr.clamp(min=floor, max=5.0) / (snr + 1)
    err = pred - target
    per_example = object_weighted_mse(err.pow(2), masks, object_weight)
    if pool == 1:
        return (per_example * weight).mean()
    min_snr = snr.clamp(max=5.0) / (snr + 1)
    coarse, detail = block_detail(err, pool)
    floored = coarse.pow(2).mean((1, 2, 3))
    if background_detail:
        if masks is None:
            raise ValueError("background_detail needs the object masks: which blocks the object touches")
        floored = floored + (detail.pow(2) * untouched_blocks(masks, pool)).mean((1, 2, 3))
    return (per_example * min_snr + floored * (weight - min_snr)).mean()


def warmup_cosine(opt, steps: int, warmup: int = 50):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def optimizer_step(opt, sched, loss, clip_params=None) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    sched.step()
