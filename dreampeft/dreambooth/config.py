"""DreamBoothConfig: every option of a run, validated; the CLI and the app are built from it.

Flag names follow diffusers' ``train_dreambooth_lora_sdxl.py`` wherever that script has the option.
Adapter options are not repeated here: they come from each method's config dataclass (their
``cli`` metadata), so ``--rank`` or ``--n_frequency`` exist exactly once, where they are defined.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..adapters import CLIP_ATTENTION, METHODS, UNET_ATTENTION, AdapterConfig, ConfigError, get_method
from ..adapters.base import conv_methods, conv_methods_text, conv_targets
from ..adapters.config import check_fields, expand_target_sets, option, require
from ..eval.metrics import DEFAULT_CLIP, DEFAULT_DINO

MAX_RESOLUTION = 4096
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class DreamBoothConfig:
    # -- inputs
    pretrained_model_name_or_path: str = option("", "hub id or local folder of an SDXL pipeline, or one SDXL "
                                                ".safetensors file in the SGM layout (community fine-tunes)")
    single_file_config: str | None = option(None, "for a .safetensors model: folder or hub id of the pipeline "
                                            "configs (default: SDXL base's, shipped with dreampeft)")
    pretrained_vae_model_name_or_path: str | None = option(None, "optional replacement VAE (hub id or folder)")
    revision: str | None = option(None, "hub revision of the model")
    instance_data_dir: str = option("", "folder of subject images (optional NAME.txt caption beside NAME.png)")
    instance_prompt: str = option("", "prompt with the identifier, e.g. 'a photo of sks dog'")
    output_dir: str = option("dreambooth-out", "where adapters, checkpoints and samples go")
    overwrite_output_dir: bool = option(False, "replace the finished run or checkpoints already in "
                                        "--output_dir (their files are removed first)")
    # -- adapter
    adapter: str = option("lora", "adapter method", choices=lambda: list(METHODS))  # the registry's
    adapter_options: dict = option({}, "method options (set by their own flags, e.g. --rank)")
    unet_target_modules: list[str] = option(list(UNET_ATTENTION), "UNet module-name suffixes to adapt, or "
                                            "named sets: attention (the default), transformer (every linear "
                                            "of the transformer blocks, as kohya's LoRA), resnets (the "
                                            "resnets' and samplers' convolutions, kohya's LoCon; LoRA, LoRA-Dash and DoRA)")
    train_text_encoder: bool = option(False, "also adapt both CLIP text encoders")
    text_encoder_target_modules: list[str] = option(list(CLIP_ATTENTION), "text-encoder module suffixes")
    text_encoder_lr: float | None = option(None, "learning rate of the text-encoder adapters (default: --learning_rate)")
    train_text_encoder_frac: float = option(1.0, "share of the steps the text-encoder adapters train; "
                                            "after it they stay fixed and prompt embeddings are cached")
    # -- prior preservation
    with_prior_preservation: bool = option(False, "add the class-prior loss (needs --class_prompt)")
    class_prompt: str | None = option(None, "prompt of the subject's class, e.g. 'a photo of a dog'")
    class_data_dir: str | None = option(None, "class images; missing ones are generated here")
    num_class_images: int = option(100, "class images to use (generated if fewer exist)")
    prior_loss_weight: float = option(1.0, "weight of the class-prior loss")
    sample_batch_size: int = option(4, "batch size when generating class images")
    # -- data
    resolution: int = option(1024, "training resolution: the side of the square bucket; the other "
                             "buckets have about as many pixels")
    aspect_buckets: bool | None = option(None, "train each image at the SDXL bucket nearest its aspect "
                                         "ratio (default: on when an instance image is not square)")
    center_crop: bool = option(False, "center-crop instead of a random crop")
    random_flip: bool = option(False, "flip horizontally with probability 0.5, drawn every step")
    repeats: int = option(1, "times each instance image is seen per epoch")
    masked_loss: bool = option(False, "weigh the loss by a subject mask: the image's alpha channel, "
                               "or --mask_dir")
    mask_dir: str | None = option(None, "folder of masks NAME.png for instance images NAME.* (white = subject)")
    mask_background_weight: float = option(0.0, "loss weight outside the mask (0: the background is ignored)")
    caption_dropout_rate: float = option(0.0, "share of captions replaced by the empty prompt, SDXL's "
                                         "unconditional (0.05-0.1 is common)")
    caption_tag_dropout_rate: float = option(0.0, "kohya's tag dropout: each comma-separated part of a caption "
                                             "after the first --keep_tokens is left out with this probability, "
                                             "drawn every step, so no part is learnt as the trigger's")
    shuffle_caption: bool = option(False, "kohya's: shuffle each caption's comma-separated parts after the "
                                   "first --keep_tokens, every step")
    keep_tokens: int = option(1, "comma-separated parts at the head of each caption that tag dropout and "
                              "shuffling never touch (the trigger's; kohya's default is 0)")
    # -- optimisation
    train_batch_size: int = option(1, "instance images per device per micro-batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    max_train_steps: int | None = option(None, "optimizer steps (overrides --num_train_epochs)")
    num_train_epochs: int = option(1, "epochs over the instance images when --max_train_steps is unset")
    learning_rate: float = option(1e-4, "adapter learning rate (FourierFT wants 1e-2 or more)")
    lr_scheduler: Literal[SCHEDULERS] = option("constant", "learning-rate schedule")
    lr_warmup_steps: int = option(0, "warm-up steps of the schedule")
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = option("adamw", "optimizer; adamw8bit needs "
                                                                    "bitsandbytes, prodigy needs prodigyopt")
    adam_beta1: float = option(0.9, "Adam β1")
    adam_beta2: float = option(0.999, "Adam β2")
    adam_weight_decay: float = option(1e-4, "weight decay of the adapter parameters")
    adam_epsilon: float = option(1e-8, "Adam ε")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)")
    snr_gamma: float | None = option(None, "min-SNR loss weighting γ (5.0 is the paper's)")
    noise_offset: float = option(0.0, "noise offset (0.0357 is a common value)")
    seed: int = option(0, "seed of everything random in the run")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "frozen weights in this dtype; "
                                                            "adapters stay float32")
    gradient_checkpointing: bool = option(False, "recompute UNet activations to save memory")
    dash_svd_cache: str | None = option(None, "LoRA-Dash: a folder that keeps the frozen weights' SVDs "
                                        "(by a hash of their bytes) so the next run's launch reads them "
                                        "(SDXL: 7.1 GB; launch 275 s → 8.8 s on this CPU)")
    dash_svd_prefetch: bool = option(True, "LoRA-Dash: decompose the frozen weights on the CPU in a background "
                                     "thread during the warm-up, so the launch does not stall (SDXL: 188 s → "
                                     "11.5 s); held in host memory (SDXL: 7.1 GB; skipped with a note when "
                                     "short) unless --dash_svd_cache keeps them on disk")
    use_ema: bool = option(False, "keep an exponential moving average of the adapter weights; "
                           "validation and the exports use it (the training weights are saved too)")
    ema_decay: float = option(0.999, "EMA decay, warmed up as min(decay, (1+t)/(10+t))")
    # -- validation, checkpoints, progress
    validation_prompt: str | None = option(None, "prompt of the validation images")
    num_validation_images: int = option(2, "images per validation")
    validation_steps: int = option(0, "validate every N steps (0: only at the end, if a prompt is given)")
    inference_steps: int = option(25, "denoising steps of validation and generated class images")
    eval_steps: int | None = option(None, "measure subject fidelity, prompt fidelity and drift every N steps "
                                    "(and at steps 0 and last; default: --validation_steps when validating; 0: off)")
    eval_prompts: list[str] = option([], "evaluation prompts with the identifier (default: the toy's recontext "
                                     "prompts, or 5 of the 25 DreamBooth prompts)")
    eval_class_prompt: str | None = option(None, "the class prompt whose drift is measured (default: "
                                           "--class_prompt, or the instance prompt without its identifier)")
    eval_images: int = option(2, "images per evaluation prompt (seeds --seed, --seed+1, ...)")
    eval_inference_steps: int = option(10, "denoising steps of each evaluation image (DPM-Solver++ on the "
                                       "model's noise schedule; on the toy 10 score as 25 Euler steps do)")
    keep_best: Literal["balanced", "subject", "last"] = option(
        "balanced", "which evaluated adapter the exports hold: best subject + prompt gain with a drift "
        "guard, best subject fidelity, or the last weights")
    dino_model: str = option(DEFAULT_DINO, "DINO model for subject fidelity off the toy (hub id or folder)")
    clip_model: str = option(DEFAULT_CLIP, "CLIP model for CLIP-I/CLIP-T off the toy (hub id or folder)")
    checkpointing_steps: int = option(0, "save a resumable checkpoint every N steps (0: never)")
    checkpoints_total_limit: int | None = option(None, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = option(None, "a checkpoint folder, or 'latest'")
    events: str | None = option(None, "write JSON-lines progress events to this file")
    report_to: Literal["none", "tensorboard", "wandb"] = option(
        "none", "experiment tracker (through accelerate): loss, lr, gradient norm, step time, validation "
        "images; files under OUTPUT_DIR/logs (W&B offline with WANDB_MODE=offline)")
    export_rank: int | None = option(32, "rank of the diffusers LoRA exported for FourierFT/MoRA "
                                     "(truncated SVD; LoRA and LoRA-Dash export exactly)")
    extra_exports: list[Literal["kohya", "kohya_diff", "peft", "merged"]] = option(
        [], "formats written besides native and diffusers: kohya (A1111/ComfyUI LoRA), kohya_diff (whole "
        "fp16 weight differences ComfyUI/A1111 add as they are: exact for every method, 1.9 GB for SDXL's UNet), "
        "peft, merged (a full pipeline folder with ΔW fused in)")
    export_energy: float | None = option(None, "instead of --export_rank: keep this share of each "
                                         "layer's squared singular values (e.g. 0.9)")

    def __post_init__(self) -> None:
        check_fields(self)
        self.unet_target_modules = expand_target_sets(self.unet_target_modules)
        if self.adapter not in METHODS:
            raise ConfigError(f"--adapter {self.adapter!r}: choose one of {sorted(METHODS)}")
        convs = conv_targets(self.unet_target_modules)
        require(not convs or self.adapter in conv_methods(),
                f"--unet_target_modules names convolutions ({', '.join(convs[:3])}), which only --adapter "
                f"{conv_methods_text()} adapt (kohya's LoCon); {self.adapter} adapts linear layers: "
                "drop resnets or change --adapter")
        require(bool(self.pretrained_model_name_or_path), "--pretrained_model_name_or_path is required")
        require(bool(self.instance_data_dir), "--instance_data_dir is required")
        require(bool(self.instance_prompt.strip()), "--instance_prompt is required, e.g. 'a photo of sks dog'")
        require(self.resolution >= 8 and self.resolution % 8 == 0,
                f"--resolution {self.resolution}: use a positive multiple of 8")
        require(self.resolution <= MAX_RESOLUTION, f"--resolution {self.resolution} is above {MAX_RESOLUTION} "
                "(SDXL trains at 1024; larger ones exhaust memory): use 1024")
        for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                     "num_validation_images", "sample_batch_size"):
            require(getattr(self, name) >= 1, f"--{name} must be >= 1 (got {getattr(self, name)})")
        require(self.max_train_steps is None or self.max_train_steps >= 1, "--max_train_steps must be >= 1")
        require(self.learning_rate > 0, f"--learning_rate must be > 0 (got {self.learning_rate})")
        require(self.text_encoder_lr is None or self.text_encoder_lr > 0,
                f"--text_encoder_lr must be > 0 (got {self.text_encoder_lr})")
        for name in ("validation_steps", "checkpointing_steps", "prior_loss_weight", "noise_offset",
                     "max_grad_norm", "lr_warmup_steps"):
            require(getattr(self, name) >= 0, f"--{name} must be >= 0 (got {getattr(self, name)}; 0 turns it off)")
        require(self.eval_steps is None or self.eval_steps >= 0, f"--eval_steps must be >= 0 (got {self.eval_steps})")
        require(self.eval_inference_steps >= 1,
                f"--eval_inference_steps must be >= 1 (got {self.eval_inference_steps})")
        require(self.eval_images >= 1, f"--eval_images must be >= 1 (got {self.eval_images})")
        require(self.inference_steps >= 1, f"--inference_steps must be >= 1 (got {self.inference_steps})")
        require(self.snr_gamma is None or self.snr_gamma > 0,
                f"--snr_gamma must be > 0 (got {self.snr_gamma}; 5.0 is the paper's): 0 would zero every loss")
        if self.with_prior_preservation:
            require(bool(self.class_prompt), "--with_prior_preservation needs --class_prompt")
            require(bool(self.class_data_dir), "--with_prior_preservation needs --class_data_dir")
            require(self.num_class_images >= 1, "--num_class_images must be >= 1 with --with_prior_preservation")
        else:
            require(self.class_prompt is None and self.class_data_dir is None,
                    "--class_prompt/--class_data_dir only apply with --with_prior_preservation")
        require(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
                "--checkpoints_total_limit must be >= 1")
        self._check_data_options()
        if self.export_energy is not None:
            require(0 < self.export_energy <= 1, f"--export_energy must be in (0, 1] (got {self.export_energy})")
            self.export_rank = None  # the energy threshold replaces the fixed rank
        require(self.export_rank is None or self.export_rank >= 1, "--export_rank must be >= 1")
        require(get_method(self.adapter).peft_writer is not None or "peft" not in self.extra_exports,
                f"--extra_exports peft: PEFT has no {self.adapter} adapter; use kohya, merged or the "
                "default diffusers file")
        if self.dash_svd_cache is not None:
            require(self.adapter == "lora_dash", f"--dash_svd_cache applies to --adapter lora_dash (got {self.adapter})")
            require(not Path(self.dash_svd_cache).is_file(),
                    f"--dash_svd_cache {self.dash_svd_cache}: that is a file; give a folder (created if missing)")
        self.adapter_config("unet")  # validates the method options now, not mid-run

    def _check_data_options(self) -> None:
        require(not (self.aspect_buckets and self.center_crop), "--aspect_buckets with --center_crop: a "
                "bucket keeps the whole image already; drop --center_crop or pass --no-aspect_buckets")
        require(self.repeats >= 1, f"--repeats must be >= 1 (got {self.repeats})")
        require(self.mask_dir is None or self.masked_loss, "--mask_dir only applies with --masked_loss")
        require(self.mask_dir is None or Path(self.mask_dir).resolve() != Path(self.instance_data_dir).resolve(),
                "--mask_dir is the instance folder: keep the masks (NAME.png) in a folder of their own")
        require(0 <= self.mask_background_weight <= 1,
                f"--mask_background_weight must be in [0, 1] (got {self.mask_background_weight})")
        require(self.masked_loss or self.mask_background_weight == 0,
                "--mask_background_weight only applies with --masked_loss")
        require(0 <= self.caption_dropout_rate < 1,
                f"--caption_dropout_rate must be in [0, 1) (got {self.caption_dropout_rate})")
        require(0 <= self.caption_tag_dropout_rate < 1,
                f"--caption_tag_dropout_rate must be in [0, 1) (got {self.caption_tag_dropout_rate})")
        require(self.keep_tokens >= 0, f"--keep_tokens must be 0 or more (got {self.keep_tokens})")
        require(0 < self.train_text_encoder_frac <= 1,
                f"--train_text_encoder_frac must be in (0, 1] (got {self.train_text_encoder_frac})")
        require(self.train_text_encoder or self.train_text_encoder_frac == 1,
                "--train_text_encoder_frac only applies with --train_text_encoder")
        require(self.single_file_config is None or self.pretrained_model_name_or_path.endswith(".safetensors"),
                "--single_file_config only applies when --pretrained_model_name_or_path is a .safetensors file")
        require(0 < self.ema_decay < 1, f"--ema_decay must be in (0, 1) (got {self.ema_decay}; 0.999 is common)")

    @property
    def eval_every(self) -> int:
        """Steps between evaluations (0: none): --eval_steps, else the validation interval."""
        if self.eval_steps is not None:
            return self.eval_steps
        return self.validation_steps if self.validation_prompt else 0

    def adapter_config(self, component: str = "unet") -> AdapterConfig:
        """The method config for ``component`` ("unet" or a text encoder)."""
        cls = get_method(self.adapter).config_cls
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(self.adapter_options) - known)
        if extra:
            raise ConfigError(f"adapter option(s) {extra} do not apply to --adapter {self.adapter}")
        targets = self.unet_target_modules if component == "unet" else self.text_encoder_target_modules
        return cls(**self.adapter_options, target_modules=list(targets))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "DreamBoothConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def adapter_option_fields() -> dict[str, list[tuple[type, dataclasses.Field]]]:
    """CLI flag → [(method config class, field)] over every method (targets excluded)."""
    skip = {f.name for f in dataclasses.fields(AdapterConfig)}
    flags: dict[str, list] = {}
    for method in METHODS.values():
        for f in dataclasses.fields(method.config_cls):
            if f.name not in skip:
                flags.setdefault(f.metadata.get("cli", "--" + f.name), []).append((method.config_cls, f))
    return flags
