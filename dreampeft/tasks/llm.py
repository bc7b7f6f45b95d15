"""Fine-tune a transformers causal LM with any dreampeft adapter, through transformers' Trainer.

    python -m dreampeft.tasks.llm --model MODEL --data train.jsonl --adapter lora_dash --rank 8 \\
        --max_steps 300 --learning_rate 1e-4 --out run/

Data: JSON lines ``{"prompt": ..., "response": ...}``; the loss is on the response tokens only.
Targets default to LLaMA's attention and MLP projections. GPT-2's ``Conv1D`` layers are not
``nn.Linear`` and are refused by name (convert the model or target Linear layers only).
Outputs: the native adapter (exact for every method) and, for LoRA, LoRA-Dash and FourierFT, a
PEFT folder ``run/peft/model`` that transformers' ``model.load_adapter`` loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import inject
from ..adapters import METHODS, ConfigError, get_method
from ..dreambooth.cli import add_adapter_arguments, adapter_options_from
from ..export import PEFT_WRITERS, export_peft
from ..state import save_adapter
from ..utils import model_load_error

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LLMConfig:
    model: str
    data: str
    output_dir: str = "llm-out"
    adapter: str = "lora"
    adapter_options: dict = field(default_factory=dict)
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    learning_rate: float = 1e-4
    max_steps: int = 100
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0

    def adapter_config(self):
        return get_method(self.adapter).config_cls(**self.adapter_options, target_modules=self.target_modules)


def load_jsonl(path: str | Path, tokenizer, max_length: int) -> list[dict]:
    """Tokenised examples with labels = -100 on the prompt (loss on the response only)."""
    path, examples = Path(path), []
    if not path.is_file():
        raise ConfigError(f"--data {path}: no such file")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, response = row["prompt"], row["response"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"--data {path}:{n}: expected a JSON object with 'prompt' and 'response'") from None
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        r = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + p + r
        labels = [-100] * (len(ids) - len(r)) + r
        examples.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    if not examples:
        raise ConfigError(f"--data {path}: no examples")
    return examples


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_llm(cfg: LLMConfig) -> dict:
    """Train; returns {"losses": [...], "trainable": n, "output_dir": ..., "model": model}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from ..hf import DashCallback

    torch.manual_seed(cfg.seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        model = AutoModelForCausalLM.from_pretrained(cfg.model)
    except (OSError, ValueError) as exc:
        raise ConfigError(model_load_error("--model", cfg.model, exc)) from None
    examples = load_jsonl(cfg.data, tokenizer, cfg.max_length)
    try:
        inject.inject_adapters(model, cfg.adapter_config())
    except TypeError as exc:  # e.g. GPT-2's Conv1D
        raise ConfigError(f"--target_modules: {exc}") from None
    args = TrainingArguments(
        output_dir=cfg.output_dir, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, logging_steps=1, save_strategy="no", report_to=[],
        seed=cfg.seed, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
        disable_tqdm=True, lr_scheduler_type="constant")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=lambda b: collate(b, pad), callbacks=[DashCallback()])
    trainer.train()
    out = Path(cfg.output_dir)
    save_adapter(model, out, extra_metadata={"base_model": cfg.model})
    if get_method(cfg.adapter).peft_writer in PEFT_WRITERS:
        export_peft({"model": model}, out / "peft", base_model=cfg.model)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "trainable": inject.trainable_parameter_count(model), "output_dir": str(out),
            "model": model}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dreampeft.tasks.llm", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="hub id or folder of a causal LM")
    p.add_argument("--data", required=True, help="JSONL with prompt/response")
    p.add_argument("--adapter", default="lora", choices=list(METHODS))
    p.add_argument("--target_modules", default=",".join(LLAMA_TARGETS))
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--max_steps", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="llm-out")
    add_adapter_arguments(p)
    given = vars(p.parse_args(argv))
    try:
        cfg = LLMConfig(model=given["model"], data=given["data"], output_dir=given["out"], adapter=given["adapter"],
                        adapter_options=adapter_options_from(given, given["adapter"]),
                        target_modules=[t for t in given["target_modules"].split(",") if t],
                        learning_rate=given["learning_rate"], max_steps=given["max_steps"],
                        batch_size=given["batch_size"], max_length=given["max_length"], seed=given["seed"])
        cfg.adapter_config()  # validate before loading anything
        report = train_llm(cfg)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    losses = report["losses"]
    print(f"{cfg.adapter}: {report['trainable']:,} trainable, loss {losses[0]:.4f} → {losses[-1]:.4f}; "
          f"saved in {report['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
