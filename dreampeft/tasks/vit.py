"""Image classification with a transformers ViT and any dreampeft adapter.

    python -m dreampeft.tasks.vit --model google/vit-base-patch16-224-in21k --train flowers/train \\
        --val flowers/val --adapter fourierft --n_frequency 3000 --fourier_scaling 300 \\
        --learning_rate 1e-2 --max_steps 500 --out run/

One subfolder per class (its name is the label). Adapters go on the query/value projections; the new
classification head trains in full (as in the FourierFT and LoRA ViT experiments). Saves the
native adapter, the head (``head.safetensors``) and the labels; prints accuracy before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import inject
from ..adapters import METHODS, ConfigError, get_method
from ..dreambooth.cli import add_adapter_arguments, adapter_options_from
from ..dreambooth.data import IMAGE_EXTENSIONS, DreamBoothError, load_image
from ..state import save_adapter
from ..utils import model_load_error

# ViT's query/value projections: "query"/"value" before transformers 5, "attention.q_proj"/
# "attention.v_proj" from it on; both spellings, so hub checkpoints of either era work.
VIT_TARGETS = ["query", "value", "attention.q_proj", "attention.v_proj"]


def load_image_folder(root: str | Path, flag: str) -> tuple[list, list[int], list[str]]:
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(classes) < 2:
        raise ConfigError(f"{flag} {root}: need one subfolder per class (at least two)")
    images, labels = [], []
    for i, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ConfigError(f"{flag} {root / name}: no images")
        images += [load_image(p) for p in files]
        labels += [i] * len(files)
    return images, labels, classes


@torch.no_grad()
@torch.no_grad()
def accuracy(model, pixels: torch.Tensor, labels: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    device = next(model.parameters()).device
    preds = torch.cat([model(pixel_values=pixels[i:i + batch].to(device)).logits.argmax(-1).cpu()
                       for i in range(0, len(pixels), batch)])
    return float((preds == labels).float().mean())


def train_vit(model_id: str, train_dir: str, val_dir: str | None, adapter: str, options: dict,
              out: str | Path, lr: float = 1e-3, max_steps: int = 100, batch_size: int = 16, seed: int = 0) -> dict:
    """Adapters on query/value and a new head, trained by transformers' ``Trainer`` (so on the GPU
    when there is one, and LoRA-Dash launches through ``DashCallback`` at its optimizer step)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments

    from ..hf import DashCallback

    images, labels, classes = load_image_folder(train_dir, "--train")
    val = load_image_folder(val_dir, "--val") if val_dir else (images, labels, classes)
    if val[2] != classes:
        raise ConfigError(f"--val classes {val[2]} differ from --train classes {classes}")
    cfg = get_method(adapter).config_cls(**options, target_modules=VIT_TARGETS)
    torch.manual_seed(seed)
    try:
        model = AutoModelForImageClassification.from_pretrained(
            model_id, id2label=dict(enumerate(classes)),
            label2id={c: i for i, c in enumerate(classes)}, ignore_mismatched_sizes=True)
        processor = AutoImageProcessor.from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        raise ConfigError(model_load_error("--model", model_id, exc)) from None
    px = processor(images=images, return_tensors="pt").pixel_values
    vpx = processor(images=val[0], return_tensors="pt").pixel_values
    inject.inject_adapters(model, cfg)
    model.classifier.requires_grad_(True)  # the new head trains in full
    before = accuracy(model, vpx, torch.tensor(val[1]))
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        seed=seed, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, disable_tqdm=True)
    data = [{"pixel_values": x, "labels": int(t)} for x, t in zip(px, labels)]
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[DashCallback()])
    trainer.train()  # train mode is the Trainer's to set; accuracy() sets eval
    after = accuracy(model, vpx, torch.tensor(val[1]))
    out = Path(out)
    save_adapter(model, out, extra_metadata={"base_model": model_id})
    head = {k: v.detach().cpu().contiguous() for k, v in model.classifier.state_dict().items()}
    save_file(head, out / "head.safetensors")
    (out / "labels.json").write_text(json.dumps(classes) + "\n")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"accuracy_before": before, "accuracy": after, "losses": losses, "model": model,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dreampeft.tasks.vit", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="hub id or folder of a ViT")
    p.add_argument("--train", required=True, help="folder with one subfolder of images per class")
    p.add_argument("--val", help="same layout; default: accuracy on --train")
    p.add_argument("--adapter", default="lora", choices=list(METHODS))
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--max_steps", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="vit-out")
    add_adapter_arguments(p)
    g = vars(p.parse_args(argv))
    try:
        r = train_vit(g["model"], g["train"], g["val"], g["adapter"], adapter_options_from(g, g["adapter"]),
                      g["out"], g["learning_rate"], g["max_steps"], g["batch_size"], g["seed"])
    except (ConfigError, DreamBoothError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{g['adapter']}: {r['trainable']:,} trainable (adapters + head), accuracy "
          f"{r['accuracy_before']:.3f} → {r['accuracy']:.3f}; saved in {g['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
