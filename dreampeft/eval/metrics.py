"""Subject fidelity as in DreamBooth (Ruiz et al. 2023, §4.1):

  * DINO:   mean pairwise cosine similarity of DINO ViT CLS features, generated vs real subject images;
  * CLIP-I: the same with CLIP image embeddings;
  * CLIP-T: mean cosine similarity between each generated image and its prompt (CLIP).

DINO is the paper's preferred subject metric: unlike CLIP it is trained to tell apart images of
the same class, so it rewards the *particular* subject. Models load by hub id or local folder;
without weights and without network, one clear message says what to pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
PROMPTS_FILE = Path(__file__).with_name("prompts.json")


class EvalError(ValueError):
    """A model or input the evaluation cannot use; the message says what to pass instead."""


def evaluation_prompts(subject: str, live: bool = False) -> list[str]:
    """The 25 DreamBooth evaluation prompts for ``subject`` (e.g. "sks dog")."""
    data = json.loads(PROMPTS_FILE.read_text())
    return [p.format(subject=subject) for p in data["live_subject" if live else "object"]]


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over all (i, j) of cos(a_i, b_j)."""
    return float((F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean())


def mean_paired_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over i of cos(a_i, b_i)."""
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def _load(loader, name: str, flag: str):
    try:
        return loader.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise EvalError(f"{flag} {name}: cannot load it ({str(exc).splitlines()[0][:160]}); offline, "
                        f"pass a local folder (e.g. python -m dreampeft.tiny {flag.split('_')[0][2:]} DIR "
                        "for a tiny random one)") from None


@dataclass
class FidelityScorer:
    dino_model: str = DEFAULT_DINO
    clip_model: str = DEFAULT_CLIP
    device: str = "cpu"

    def __post_init__(self):
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

        self.dino = _load(AutoModel, self.dino_model, "--dino_model").to(self.device).eval()
        self.dino_proc = _load(AutoImageProcessor, self.dino_model, "--dino_model")
        self.clip = _load(CLIPModel, self.clip_model, "--clip_model").to(self.device).eval()
        self.clip_proc = _load(CLIPProcessor, self.clip_model, "--clip_model")

    @torch.no_grad()
    def dino_features(self, images) -> torch.Tensor:
        pixels = self.dino_proc(images=images, return_tensors="pt").pixel_values.to(self.device)
        return self.dino(pixel_values=pixels).last_hidden_state[:, 0]  # CLS token

    @torch.no_grad()
    def clip_image_features(self, images) -> torch.Tensor:
        pixels = self.clip_proc(images=images, return_tensors="pt").pixel_values.to(self.device)
        out = self.clip.get_image_features(pixel_values=pixels)
        return getattr(out, "pooler_output", out)

    @torch.no_grad()
    def clip_text_features(self, prompts: list[str]) -> torch.Tensor:
        tok = self.clip_proc.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        out = self.clip.get_text_features(**{k: v.to(self.device) for k, v in tok.items()})
        return getattr(out, "pooler_output", out)

    def score(self, real, generated, prompts: list[str] | None = None) -> dict:
        """DINO, CLIP-I (generated vs real) and, given one prompt per generated image, CLIP-T."""
        if not real or not generated:
            raise EvalError("need at least one real and one generated image")
        result = {"dino": mean_pairwise_cosine(self.dino_features(generated), self.dino_features(real)),
                  "clip_i": mean_pairwise_cosine(self.clip_image_features(generated), self.clip_image_features(real)),
                  "n_real": len(real), "n_generated": len(generated)}
        if prompts is not None:
            if len(prompts) != len(generated):
                raise EvalError(f"{len(prompts)} prompts for {len(generated)} generated images: give one each")
            result["clip_t"] = mean_paired_cosine(self.clip_image_features(generated),
                                                  self.clip_text_features(prompts))
        return result
