"""GRPOFixTrainer in the precisions and adapters production runs use, on both loss paths: the torch
path (TRL's log-probs) and the logits-free path forced through the Triton interpreter (on CUDA it
is the default).  Each trains 3 steps: the loss is finite and the parameters that should move move
(and, with LoRA, only those).

- ``bf16=True`` with an fp32 model (TRL's default precision: autocast), and a bf16 model;
- a LoRA adapter (PEFT): the decoder is found through the ``PeftModel`` wrapper;
- gradient checkpointing (TRL's default ``gradient_checkpointing=True``).
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

pytest.importorskip("trl")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_trl import TRAINER_BASE, build_dataset, build_model, build_tokenizer, reward_len  # noqa: E402

from grpo_fix.integration.trl import GRPOFixConfig, GRPOFixTrainer  # noqa: E402

BACKENDS = ["torch", "triton"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def needs_backend(backend):
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the logits-free path needs CUDA or TRITON_INTERPRET=1")


def train(tmp_path, tok, backend, model=None, peft_config=None, **kw):
    args = GRPOFixConfig(
        output_dir=str(tmp_path),
        **{**TRAINER_BASE, "use_cpu": True, "num_iterations": 2, "loss_backend": backend, **kw},
    )
    trainer = GRPOFixTrainer(
        model=build_model(tok, seed=0) if model is None else model,
        reward_funcs=reward_len,
        args=args,
        train_dataset=build_dataset(),
        processing_class=tok,
        peft_config=peft_config,
    )
    assert trainer._gf_path.linear == (backend == "triton")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs), logs
    after = dict(trainer.model.named_parameters())
    moved = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in after.items() if p.requires_grad}
    return trainer, moved, trainable


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_with_fp32_model(backend, tmp_path, tok):
    needs_backend(backend)
    trainer, moved, trainable = train(tmp_path, tok, backend, bf16=True)
    assert next(trainer.model.parameters()).dtype == torch.float32
    assert trainer.accelerator.mixed_precision == "bf16"
    assert moved == trainable


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_model(backend, tmp_path, tok):
    needs_backend(backend)
    model = build_model(tok, seed=0).to(torch.bfloat16)
    _, moved, trainable = train(tmp_path, tok, backend, model=model, learning_rate=5e-2)
    assert len(moved) > len(trainable) // 2  # bf16 rounding may swallow the smallest updates


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_adapter(backend, tmp_path, tok):
    needs_backend(backend)
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer, moved, trainable = train(tmp_path, tok, backend, peft_config=lora)
    assert isinstance(trainer.model, peft.PeftModel)
    assert trainable and all("lora_" in n for n in trainable)
    assert moved == trainable  # A gets a gradient from the second step on (B starts at zero)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_checkpointing(backend, tmp_path, tok):
    needs_backend(backend)
    _, moved, trainable = train(tmp_path, tok, backend, gradient_checkpointing=True)
    assert moved == trainable


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_with_bf16_autocast_and_gradient_checkpointing(backend, tmp_path, tok):
    """TRL's production defaults together: bf16 autocast, gradient checkpointing, a LoRA adapter."""
    needs_backend(backend)
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    _, moved, trainable = train(tmp_path, tok, backend, peft_config=lora, bf16=True, gradient_checkpointing=True)
    assert moved == trainable
