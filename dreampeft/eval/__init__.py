"""Subject-fidelity metrics (DINO, CLIP-I, CLIP-T) and the DreamBooth evaluation prompts."""

from .metrics import (DEFAULT_CLIP, DEFAULT_DINO, EvalError, FidelityScorer, evaluation_prompts,
                      mean_paired_cosine, mean_pairwise_cosine)

__all__ = ["DEFAULT_CLIP", "DEFAULT_DINO", "EvalError", "FidelityScorer", "evaluation_prompts",
           "mean_paired_cosine", "mean_pairwise_cosine"]
