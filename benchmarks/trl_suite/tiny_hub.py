"""Offline stand-ins for the Hub repositories that TRL's ``tests/test_grpo_trainer.py`` loads.

TRL's tests name tiny checkpoints on the Hub (``trl-internal-testing/tiny-Qwen2ForCausalLM-2.5``, ...). This
module builds a checkpoint of the same architecture and size (the shapes of TRL's
``scripts/generate_tiny_models``) for each id it knows, over a byte-level BPE tokenizer trained here on a small
corpus and carrying the family's real chat template (the ``.jinja`` files TRL ships in ``trl/chat_templates``),
and writes it into a Hugging Face cache folder in the Hub's own layout
(``models--org--name/refs/main`` + ``snapshots/<hash>/``). With ``HF_HUB_CACHE`` pointing there and
``HF_HUB_OFFLINE=1``, every ``from_pretrained`` (the test's, TRL's, PEFT's) resolves the id locally, unchanged.

What differs from the Hub checkpoints: the vocabulary (a few hundred BPE merges; for the Qwen families padded
with unreachable fillers so that the special tokens keep their real ids and the model its 151k-row embedding,
since TRL's tests hard-code ``<|im_end|>`` = 151645) and the random weights. Vision-language ids have no
builder: their processors need the original tokenizer/processor files and torchvision (the video processor);
:func:`missing_ids` lists the ids a test names that this module cannot build, and the suite's conftest skips
those tests in both runs.

    build_hub(Path("hub"))      # idempotent; rebuilt when HUB_VERSION changes
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

HUB_VERSION = "4"
ORG = "trl-internal-testing"

# Text the tokenizer is trained on: the prompts of TRL's "zen" datasets, tool-call syntax, digits.
CORPUS = [
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.",
    "Complex is better than complicated. Flat is better than nested. Sparse is better than dense.",
    "Readability counts. Special cases aren't special enough to break the rules.",
    "Although practicality beats purity. Errors should never pass silently. Unless explicitly silenced.",
    "In the face of ambiguity, refuse the temptation to guess.",
    "There should be one-- and preferably only one --obvious way to do it.",
    "Although that way may not be obvious at first unless you're Dutch. Now is better than never.",
    "Although never is often better than *right* now. If the implementation is hard to explain, it's a bad idea.",
    "If the implementation is easy to explain, it may be a good idea.",
    "Namespaces are one honking great idea -- let's do more of those!",
    "What is better than ugly? What counts? Any great ideas? When can errors pass silently?",
    "user assistant system tool function name arguments multiply a b result content type text image",
    '{"name": "multiply_tool", "arguments": {"a": 3, "b": 4}} 0 1 2 3 4 5 6 7 8 9 10 12 100',
    "The sky is blue. The answer is 42. Let me think step by step.",
]

# (family) -> chat template file in trl/chat_templates (or inline text), bos, eos, pad, unk, extra specials,
# generation-config eos tokens (the end-of-turn tokens the model's generation_config lists)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Qwen's added tokens, in their real order from id 151643 (TRL's tests hard-code <|im_end|> = 151645 and
# <|endoftext|> = 151643); Qwen3 appends the last four.
QWEN_ADDED = (
    "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> <|box_end|> "
    "<|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|> "
    "<tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|> "
    "<tool_response> </tool_response> <think> </think>"
).split()
QWEN_FIRST_ADDED_ID = 151643
QWEN = dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", gen_eos=("<|endoftext|>",))
FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2_5": dict(QWEN, template="qwen2_5.jinja", added=QWEN_ADDED[:22]),
    "qwen3": dict(QWEN, template="qwen3.jinja", added=QWEN_ADDED),
    "llama3_2": dict(
        template="llama3_2.jinja",
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad=None,
        extra=("<|end_of_text|>", "<|eom_id|>", "<|python_tag|>"),
    ),
    "mistral": dict(
        template=MISTRAL_TEMPLATE, bos="<s>", eos="</s>", pad=None, unk="<unk>", extra=("[INST]", "[/INST]")
    ),
    "gemma": dict(
        template="gemma.jinja", bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", gen_eos=("<end_of_turn>",)
    ),
    "cohere2": dict(template="cohere2.jinja", bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>"),
    "gptoss": dict(template="gptoss.jinja", bos="<|startoftext|>", eos="<|return|>", pad="<|endoftext|>"),
    "glm4moe": dict(
        template="glm4moe.jinja",
        bos=None,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        extra=("[gMASK]",),
        gen_eos=("<|user|>", "<|observation|>"),
    ),
    "nemotron": dict(template="nemotron_3_nano.jinja", bos="<s>", eos="<|im_end|>", pad="<SPECIAL_12>", unk="<unk>"),
}
TEMPLATE_TOKEN = re.compile(r"<\|[^<>\s|]+\|>|</?[a-z_]+>")


def _chat_template(name: str) -> str:
    if not name.endswith(".jinja"):
        return name
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / name).read_text(encoding="utf-8")


def _at_fixed_ids(tok, added: list[str], first_id: int):
    """``tok`` with unreachable filler entries up to ``first_id`` and ``added`` from there (special when written
    ``<|...|>``): the ids of the original vocabulary for the tokens that matter, a few hundred real merges."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"\u0120unused{i}": i for i in range(len(vocab), first_id)})  # "\u0120": byte-level space
    vocab.update({t: first_id + k for k, t in enumerate(added)})
    spec["model"]["ignore_merges"] = False  # fillers are never produced: no merge leads to them
    flags = dict(single_word=False, lstrip=False, rstrip=False, normalized=False)
    spec["added_tokens"] = [
        dict(id=first_id + k, content=t, special=t.startswith("<|"), **flags) for k, t in enumerate(added)
    ]
    return Tokenizer.from_str(json.dumps(spec))


def build_tokenizer(family: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on :data:`CORPUS` with ``family``'s chat template and special tokens.

    Qwen families: the real added-token table at the real ids (:data:`QWEN_ADDED`), after unreachable fillers.
    Others: tokens written ``<|...|>`` in the template, and bos/eos/pad/unk, are special (dropped by
    ``skip_special_tokens``); other template tags (``<tool_call>``, ``<think>``, ...) are plain added tokens, so
    a decoded completion keeps them.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    template = _chat_template(spec["template"])
    named = [spec.get(k) for k in ("bos", "eos", "pad", "unk")]
    special = sorted({t for t in named if t} | {t for t in TEMPLATE_TOKEN.findall(template) if t.startswith("<|")})
    special += [t for t in spec.get("extra", ()) if t not in special]
    special += [t for t in spec.get("gen_eos", ()) if t not in special]
    plain = sorted({t for t in TEMPLATE_TOKEN.findall(template) if not t.startswith("<|")} - set(special))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[] if "added" in spec else special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if "added" in spec:
        tok = _at_fixed_ids(tok, spec["added"], QWEN_FIRST_ADDED_ID)
    else:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in plain])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.get("bos"),
        eos_token=spec["eos"],
        pad_token=spec.get("pad"),
        unk_token=spec.get("unk"),
    )
    tokenizer.chat_template = template
    return tokenizer


def _generation_config(tokenizer, family: str):
    from transformers import GenerationConfig

    eos = [tokenizer.convert_tokens_to_ids(t) for t in (FAMILIES[family]["eos"], *FAMILIES[family].get("gen_eos", ()))]
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tokenizer.pad_token_id,
    )


def _init_tiny(model, seed: int) -> None:
    """Xavier-uniform linear weights, zero biases, N(0, 0.02) embeddings (TRL's tiny-model init), seeded."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                bound = (6.0 / (module.in_features + module.out_features)) ** 0.5
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 2 * bound - bound)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)


def _ids(tokenizer) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


TEXT = dict(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=32)
SEQ_CLS = dict(TEXT, hidden_size=16, num_labels=1)


def _model(config_cls: str, model_cls: str, family: str, base: dict = TEXT, **extra: Any) -> Callable[[], tuple]:
    """A builder of ``model_cls(config_cls(**base, **extra))`` over ``family``'s tokenizer (ids filled in)."""

    def build() -> tuple:
        import transformers

        tokenizer = build_tokenizer(family)
        config = getattr(transformers, config_cls)(**{**base, **_ids(tokenizer), **extra})
        return getattr(transformers, model_cls)(config), tokenizer, _generation_config(tokenizer, family)

    return build


def _remote() -> tuple:
    """A Llama under ``model_type="remote"`` that only ``trust_remote_code=True`` can load (TRL's
    tiny-RemoteForCausalLM); its two code files are written next to the weights by :func:`build_hub`."""
    return _model("LlamaConfig", "LlamaForCausalLM", "llama3_2")()


REMOTE_CONFIG = """from transformers import LlamaConfig


class RemoteConfig(LlamaConfig):
    model_type = "remote"
"""
REMOTE_MODELING = """from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

from .configuration_remote import RemoteConfig


class RemoteModel(LlamaModel):
    config_class = RemoteConfig


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig


class RemoteForSequenceClassification(LlamaForSequenceClassification):
    config_class = RemoteConfig
"""


BUILDERS: dict[str, Callable[[], tuple]] = {
    "tiny-Qwen2ForCausalLM-2.5": _model("Qwen2Config", "Qwen2ForCausalLM", "qwen2_5"),
    "tiny-Qwen3ForCausalLM": _model("Qwen3Config", "Qwen3ForCausalLM", "qwen3"),
    "tiny-Qwen3MoeForCausalLM": _model(
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen3", num_experts=4, num_experts_per_tok=2, head_dim=128
    ),
    "tiny-LlamaForCausalLM-3.2": _model("LlamaConfig", "LlamaForCausalLM", "llama3_2"),
    "tiny-MistralForCausalLM-0.2": _model("MistralConfig", "MistralForCausalLM", "mistral"),
    "tiny-Gemma2ForCausalLM": _model("Gemma2Config", "Gemma2ForCausalLM", "gemma"),
    "tiny-Cohere2ForCausalLM": _model(
        "Cohere2Config", "Cohere2ForCausalLM", "cohere2", logit_scale=1.0, rope_theta=50000
    ),
    "tiny-GptOssForCausalLM": _model(
        "GptOssConfig", "GptOssForCausalLM", "gptoss", num_local_experts=4, num_experts_per_tok=2
    ),
    "tiny-Glm4MoeForCausalLM": _model(
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        "glm4moe",
        moe_intermediate_size=32,
        head_dim=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        attention_bias=True,
        use_qk_norm=True,
    ),
    "tiny-NemotronHForCausalLM-nano": _model(
        "NemotronHConfig",
        "NemotronHForCausalLM",
        "nemotron",
        hidden_size=16,
        layers_block_type=["mamba", "attention", "moe"],
        mamba_num_heads=8,
        mamba_head_dim=4,
        mamba_n_groups=1,
        ssm_state_size=16,
        mamba_d_conv=4,
        mamba_expand=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32,
        use_mamba_kernels=False,
    ),
    "tiny-RemoteForCausalLM": _remote,
    "tiny-Qwen2ForSequenceClassification-2.5": _model(
        "Qwen2Config", "Qwen2ForSequenceClassification", "qwen2_5", SEQ_CLS
    ),
    "tiny-Qwen3ForSequenceClassification": _model("Qwen3Config", "Qwen3ForSequenceClassification", "qwen3", SEQ_CLS),
    "tiny-LlamaForSequenceClassification-3.2": _model(
        "LlamaConfig", "LlamaForSequenceClassification", "llama3_2", SEQ_CLS
    ),
}


def known_ids() -> set[str]:
    return {f"{ORG}/{name}" for name in BUILDERS}


def missing_ids(source: str) -> list[str]:
    """The ``trl-internal-testing/tiny-*`` ids named in ``source`` that this module cannot build."""
    named = set(re.findall(rf"{ORG}/tiny-[A-Za-z0-9_.-]+", source))
    return sorted(named - known_ids())


def _save(repo_dir: Path, name: str, seed: int) -> None:
    import torch

    model, processor, generation_config = BUILDERS[name]()
    _init_tiny(model, seed)
    model = model.to(torch.bfloat16)  # TRL's tiny checkpoints are stored in bf16 (TRL loads them in fp32)
    model.save_pretrained(repo_dir)
    processor.save_pretrained(repo_dir)
    generation_config.save_pretrained(repo_dir)
    if name == "tiny-RemoteForCausalLM":
        (repo_dir / "configuration_remote.py").write_text(REMOTE_CONFIG)
        (repo_dir / "modeling_remote.py").write_text(REMOTE_MODELING)
        cfg = json.loads((repo_dir / "config.json").read_text())
        cfg.update(
            model_type="remote",
            architectures=["RemoteForCausalLM"],
            auto_map={
                "AutoConfig": "configuration_remote.RemoteConfig",
                "AutoModel": "modeling_remote.RemoteModel",
                "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
                "AutoModelForSequenceClassification": "modeling_remote.RemoteForSequenceClassification",
            },
        )
        (repo_dir / "config.json").write_text(json.dumps(cfg, indent=2))


def build_hub(cache_dir: Path) -> Path:
    """Write every known tiny repository into ``cache_dir`` (an ``HF_HUB_CACHE``) in the Hub's layout."""
    stamp = cache_dir / f".tiny_hub_v{HUB_VERSION}"
    if stamp.exists():
        return cache_dir
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    for i, name in enumerate(sorted(BUILDERS)):
        repo = f"{ORG}/{name}"
        commit = hashlib.sha1(f"{repo}@{HUB_VERSION}".encode()).hexdigest()
        folder = cache_dir / f"models--{repo.replace('/', '--')}"
        snapshot = folder / "snapshots" / commit
        snapshot.mkdir(parents=True)
        _save(snapshot, name, seed=i)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(commit)
    stamp.write_text("")
    return cache_dir


if __name__ == "__main__":
    import sys

    print(build_hub(Path(sys.argv[1])))
