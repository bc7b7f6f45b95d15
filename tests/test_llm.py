"""The adapter core on a transformers causal LM through transformers' Trainer."""

from __future__ import annotations

import json
import random

import pytest
import torch

import dreampeft as dp
from dreampeft.adapters import ConfigError
from dreampeft.tasks.llm import LLMConfig, main, train_llm
from dreampeft.tiny import build_tiny_llama, save_pair

OPTIONS = {"lora": {"r": 4}, "lora_dash": {"r": 4, "warmup_steps": 5, "n_directions": 4},
           "fourierft": {"n_frequency": 200, "scaling": 50.0, "init": "zeros"}, "mora": {"r": 4}, "dora": {"r": 4}}
LR = {"lora": 3e-3, "lora_dash": 3e-3, "fourierft": 5e-2, "mora": 3e-3, "dora": 3e-3}


@pytest.fixture(scope="module")
def llm_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    model_dir = save_pair(build_tiny_llama(0), root / "model")
    rng = random.Random(0)
    hexs = lambda: "".join(rng.choice("0123456789abcdef") for _ in range(6))
    rows = [{"prompt": f"key {hexs()} ->", "response": f" {hexs()}"} for _ in range(16)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return model_dir, root / "data.jsonl"


def _logits(model):
    ids = torch.tensor([[1, 40, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_every_method_trains_saves_reloads_merges(method, llm_setup, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, data = llm_setup
    report = train_llm(LLMConfig(model=str(model_dir), data=str(data), output_dir=str(tmp_path), adapter=method,
                                 adapter_options=OPTIONS[method], learning_rate=LR[method], max_steps=15))
    losses, model = report["losses"], report["model"].eval()
    assert len(losses) == 15 and sum(losses[-3:]) < sum(losses[:3]), losses
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    dp.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=0, atol=0)
    dp.merge_adapters(fresh)
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=1e-4, atol=1e-4)
    if method == "lora_dash":
        assert dp.is_dash_active(model)  # launched by DashCallback at optimizer step 5
    if method in ("lora", "lora_dash", "fourierft"):  # PEFT export, loaded by transformers itself
        other = AutoModelForCausalLM.from_pretrained(model_dir)
        other.load_adapter(str(tmp_path / "peft" / "model"))
        torch.testing.assert_close(_logits(other), _logits(model), rtol=1e-4, atol=1e-5)


def test_cli_and_clear_errors(llm_setup, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir, data = llm_setup
    assert main(["--model", str(model_dir), "--data", str(data), "--adapter", "mora", "--rank", "2",
                 "--max_steps", "2", "--out", str(tmp_path / "run")]) == 0
    assert "mora:" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "no response"}\n')
    assert main(["--model", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "bad.jsonl:2: expected a JSON object with 'prompt' and 'response'" in capsys.readouterr().err
    assert main(["--model", str(model_dir), "--data", str(data), "--n_frequency", "9"]) == 2
    assert "--n_frequency applies to --adapter fourierft, not lora" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=260)).save_pretrained(gpt2)
    build_tiny_llama(0)[1].save_pretrained(gpt2)
    with pytest.raises(ConfigError, match=r"c_attn \(Conv1D\)"):
        train_llm(LLMConfig(model=str(gpt2), data=str(data), target_modules=["c_attn"], max_steps=1))
