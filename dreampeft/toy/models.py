"""The toy model's architecture (SDXL's, small) and the judge that scores toy-world images.

The UNet and VAE are diffusers' SDXL classes at small widths: a ``text_time`` UNet with
cross-attention at 8×8 and 4×4 (of 16×16 latents), and a 4× VAE (64 px images → 16×16×4 latents, so a
small star still spans several latent pixels). The text encoders are the tiny random CLIP pair
of ``dreampeft.tiny`` at the start; pretraining trains them with the UNet (see pretrain.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..toyworld import BACKGROUNDS, OBJECT_COLOURS, OBJECTS, POSITIONS, SIZES, Scene
from ..tiny import TE1_HIDDEN, TE2_HIDDEN, TE2_PROJ, TIME_DIM

LATENT_SIDE = 16


ATTENTION_16 = ("none", "up", "both")  # where the 16×16 level has (self- and cross-) attention


def build_toy_unet(seed: int = 0, attention_16: str = "none", width: int = 1):
    """The toy UNet; ``width`` multiplies every level's channels (32, 64, 128 at 1)."""
    from diffusers import UNet2DConditionModel

    if attention_16 not in ATTENTION_16:
        raise ValueError(f"attention_16 must be one of {', '.join(ATTENTION_16)} (got {attention_16!r})")
    first_down = "CrossAttnDownBlock2D" if attention_16 == "both" else "DownBlock2D"
    last_up = "UpBlock2D" if attention_16 == "none" else "CrossAttnUpBlock2D"
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIDE, in_channels=4, out_channels=4, norm_num_groups=16, use_linear_projection=True,
        block_out_channels=(32 * width, 64 * width, 128 * width), layers_per_block=1, attention_head_dim=(2, 4, 4),
        down_block_types=(first_down, "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", last_up),
        transformer_layers_per_block=(1, 1, 1), cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + TE2_PROJ)


def toy_unet_shape(unet) -> tuple[int, str]:
    """(unet_width, attention_16) of a UNet ``build_toy_unet`` built: what a report records, read off
    the model itself (after ``--init`` the flags' defaults are not the folder's)."""
    cfg = unet.config
    attention_16 = ("both" if cfg.down_block_types[0].startswith("CrossAttn")
                    else "up" if cfg.up_block_types[-1].startswith("CrossAttn") else "none")
    return cfg.block_out_channels[0] // 32, attention_16


def build_toy_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, norm_num_groups=8,
                         block_out_channels=(16, 32, 32), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


# The judge's heads: what it reads off an image. Subjects have no colour label (-100: ignored).
HEADS = {"object": OBJECTS, "colour": OBJECT_COLOURS, "background": BACKGROUNDS,
         "position": tuple(POSITIONS), "size": tuple(SIZES)}


def scene_labels(scene: Scene) -> dict[str, int]:
    value = {"object": scene.shape, "colour": scene.colour, "background": scene.background,
             "position": scene.position, "size": scene.size}
    return {h: HEADS[h].index(v) if v in HEADS[h] else -100 for h, v in value.items()}


class Judge(nn.Module):
    """A small CNN trained on the world (subjects included) to read object, colour, background,
    position and size off a 64×64 image: the toy benchmark's offline fidelity metric."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for out in (32, 64, 96, 128):  # 64 → 4 px; flattening keeps where things are
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            c = out
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 16, 256), nn.SiLU())
        self.heads = nn.ModuleDict({h: nn.Linear(256, len(v)) for h, v in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels`` in [-1, 1], (N, 3, 64, 64) → logits per head."""
        z = self.features(pixels)
        return {h: head(z) for h, head in self.heads.items()}

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(pixels)
