"""A tiny random Qwen2 model, a locally trained tokenizer and a prompt dataset, built in code.

Shared by the TRL integration tests, the 2-rank DeepSpeed workers and the CPU example: no hub
access is ever needed (``HF_HUB_OFFLINE=1``).  Everything is deterministic for a given seed.

    tok = build_tokenizer()
    model = build_model(tok, seed=0)
    ds = build_dataset()
    path = save_tiny(dir)          # model + tokenizer on disk (needed for beta > 0: TRL loads the
                                   # reference model from ``config._name_or_path``)
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "what is 2 + 2 ?",
    "hello world",
    "count to five: one two three four five",
    "write a short poem about the sea and the sky",
    "the quick brown fox jumps over the lazy dog",
    "abcdefghijklmnopqrstuvwxyz 0123456789",
    "a b c d e f g h i j k l m n o p",
] * 8

PROMPTS = ["what is 2 + 2 ?", "hello world", "count to five:", "write a short poem"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on :data:`CORPUS` (left padding, as TRL expects)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|eos|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>")
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A randomly initialised 2-layer Qwen2ForCausalLM (~30k parameters at hidden 32): the toy
    policy of :func:`grpo_fix.lab.toy.build_model`, over this module's BPE tokenizer."""
    import torch

    from grpo_fix.lab.toy import build_model as toy_model

    torch.manual_seed(seed)  # callers rely on the global RNG being seeded here, as before
    return toy_model(tokenizer, seed=seed, hidden_size=hidden_size, num_layers=num_layers)


def build_dataset(n_repeat: int = 8):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS * n_repeat})


def save_tiny(directory: str, seed: int = 0) -> str:
    """Save the tiny model + tokenizer to ``directory`` and return it (a loadable model path)."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def reward_len(completions, **kwargs):
    """Prefer completions of about 10 characters (any deterministic, non-constant reward works)."""
    return [-abs(len(c) - 10) / 10 for c in completions]


def reward_char(completions, **kwargs):
    """Share of the letter 'o' in the completion (a second, learnable reward)."""
    return [c.count("o") / max(len(c), 1) for c in completions]


def fixed_generation(tok, n_rows=16, group=4, prompt_len=5, comp_len=8, seed=0, beta=False):
    """Prompt/completion ids with shared prefixes inside groups, ragged lengths, group-centred
    advantages, and old/ref log-probs perturbed from the seed-0 model so ratios clip."""
    import torch

    g = torch.Generator().manual_seed(seed)
    V = len(tok)
    prompt_ids = torch.randint(5, V, (n_rows, prompt_len), generator=g)
    prompt_mask = torch.ones(n_rows, prompt_len, dtype=torch.long)
    prompt_mask[::3, 0] = 0  # some left padding
    prompt_ids[prompt_mask == 0] = tok.pad_token_id
    completion_ids = torch.randint(5, V, (n_rows, comp_len), generator=g)
    for s in range(0, n_rows, group):  # whole group shares 2 tokens, pairs share a 3rd and 4th
        completion_ids[s : s + group, :2] = completion_ids[s, :2]
        completion_ids[s + 1, :4] = completion_ids[s, :4]
    lengths = torch.randint(2, comp_len + 1, (n_rows,), generator=g)
    completion_mask = (torch.arange(comp_len)[None, :] < lengths[:, None]).long()
    completion_ids[completion_mask == 0] = tok.pad_token_id
    rewards = torch.randn(n_rows, generator=g)
    grouped = rewards.view(-1, group)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).reshape(-1)

    model = build_model(tok, seed=0)
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        am = torch.cat([prompt_mask, completion_mask], 1)
        logits = model(input_ids=ids, attention_mask=am).logits[:, prompt_len - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1)
    old = logp + 0.3 * torch.randn(logp.shape, generator=g)
    out = dict(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=advantages,
        num_items_in_batch=completion_mask.sum(),
        old_per_token_logps=old,
    )
    if beta:
        out["ref_per_token_logps"] = logp + 0.2 * torch.randn(logp.shape, generator=g)
    return out


#: GRPOFixConfig settings shared by the TRL tests and their 2-rank workers (tiny and fast on CPU).
TRAINER_BASE = dict(
    bf16=False,
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=8,
    max_steps=3,
    learning_rate=1e-2,
    logging_steps=1,
    report_to="none",
    save_strategy="no",
    seed=0,
    gradient_checkpointing=False,
)


def exit_after_barrier() -> None:
    """End a torchrun worker without running C++ static destructors: a DeepSpeed/gloo background
    thread still joinable at interpreter exit aborts the process ("terminate called without an
    active exception", exit -6) now and then, after all the work is done and reported."""
    import sys

    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
