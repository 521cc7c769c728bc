"""GRPOFixConfig / GRPOFixTrainer refuse, at construction, every combination they cannot honour,
each with a message naming the fix (one test per message); accepted combinations stay accepted."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings

import pytest
import torch

pytest.importorskip("trl")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import trl  # noqa: E402
from tiny_trl import TRAINER_BASE, build_dataset, build_model, build_tokenizer, reward_len  # noqa: E402

from grpo_fix import ClipAwareAdamW  # noqa: E402
from grpo_fix.integration.trl import GRPOFixConfig, GRPOFixTrainer  # noqa: E402
from grpo_fix.integration.trl.version import check_trl_version  # noqa: E402

BASE = dict(TRAINER_BASE, use_cpu=True)
DS_BASE = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}


def make_args(tmp_path, **kw):
    return GRPOFixConfig(output_dir=str(tmp_path), **{**BASE, **kw})


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def make_trainer(tmp_path, tok, model=None, optimizers=(None, None), **kw):
    return GRPOFixTrainer(
        model=build_model(tok, seed=0) if model is None else model,
        reward_funcs=reward_len,
        args=make_args(tmp_path, **kw),
        train_dataset=build_dataset(),
        processing_class=tok,
        optimizers=optimizers,
    )


# ------------------------------------------------------------------------------------------------
# vocabulary
# ------------------------------------------------------------------------------------------------
def test_unknown_loss_type(tmp_path):
    with pytest.raises(ValueError, match=r"unknown loss_type 'gspo'.*'uniform'.*'dapo'.*'luspo'"):
        make_args(tmp_path, loss_type="gspo")


@pytest.mark.parametrize("loss_type", ["sapo", "vespo", "luspo", "cispo", "bnpo", "dr_grpo"])
def test_every_trl_loss_type_is_accepted(tmp_path, loss_type):
    assert make_args(tmp_path, loss_type=loss_type).loss_type == loss_type


def test_unknown_optimizer(tmp_path):
    with pytest.raises(ValueError, match=r"unknown optimizer 'sgd'.*'clip_aware_adamw', 'adamw'"):
        make_args(tmp_path, optimizer="sgd")


def test_unknown_loss_backend(tmp_path):
    with pytest.raises(ValueError, match=r"loss_backend must be one of \('auto', 'torch', 'triton'\)"):
        make_args(tmp_path, loss_backend="linear")


def test_loss_kernel_is_deprecated_and_mapped(tmp_path):
    with pytest.warns(DeprecationWarning, match=r"loss_kernel='linear'.*loss_backend='triton'"):
        args = make_args(tmp_path, loss_kernel="linear")
    assert (args.loss_backend, args.loss_kernel) == ("triton", None)
    with pytest.raises(ValueError, match=r"unknown loss_kernel 'cuda'.*use loss_backend"):
        make_args(tmp_path, loss_kernel="cuda")
    with pytest.raises(ValueError, match=r"contradicts loss_backend='torch'; set loss_backend only"):
        with pytest.warns(DeprecationWarning):
            make_args(tmp_path, loss_kernel="linear", loss_backend="torch")


def test_unknown_loss_compile_math(tmp_path):
    with pytest.raises(ValueError, match=r"loss_compile_math must be one of"):
        make_args(tmp_path, loss_compile_math="sometimes")


def test_unknown_entropy_weighting(tmp_path):
    with pytest.raises(ValueError, match=r"entropy_weighting must be one of \('auto', 'window', 'micro_batch'\)"):
        make_args(tmp_path, entropy_weighting="token")


# ------------------------------------------------------------------------------------------------
# loss options
# ------------------------------------------------------------------------------------------------
def test_uniform_refuses_sequence_ratios(tmp_path):
    with pytest.raises(ValueError, match=r"loss_type='uniform' needs token-level.*importance_sampling_level='token'"):
        make_args(tmp_path, loss_type="uniform", importance_sampling_level="sequence")
    make_args(tmp_path, loss_type="grpo", importance_sampling_level="sequence")  # GSPO is fine


def test_cispo_refuses_sequence_ratios(tmp_path):
    with pytest.raises(ValueError, match=r"loss_type='cispo' with importance_sampling_level='sequence'.*'token'"):
        make_args(tmp_path, loss_type="cispo", importance_sampling_level="sequence")


@pytest.mark.parametrize("mode", ["sequence_mask", "sequence_truncate"])
def test_uniform_refuses_sequence_vllm_weights(tmp_path, mode):
    with pytest.raises(ValueError, match=rf"vllm_importance_sampling_mode='{mode}'.*'token_truncate' or 'token_mask'"):
        make_args(tmp_path, use_vllm=True, vllm_importance_sampling_mode=mode)


@pytest.mark.parametrize("mode", ["token_mask", "token_truncate"])
def test_vllm_configs_are_accepted(tmp_path, mode):
    """vLLM with its importance-sampling correction (TRL's default) builds without a server."""
    args = make_args(tmp_path, use_vllm=True, vllm_importance_sampling_mode=mode)
    assert args.use_vllm and args.vllm_importance_sampling_correction
    make_args(tmp_path, use_vllm=True, loss_type="dapo")  # TRL's default sequence_mask, TRL's loss type


def test_prefix_consistent_true_where_undefined(tmp_path):
    with pytest.raises(ValueError, match=r"prefix_consistent=True is only defined.*set prefix_consistent=False"):
        make_args(tmp_path, loss_type="grpo", prefix_consistent=True)
    assert make_args(tmp_path, loss_type="grpo").prefix_consistent is False  # None: off where undefined
    assert make_args(tmp_path, loss_type="luspo").prefix_consistent is True
    assert make_args(tmp_path, loss_type="dapo", prefix_consistent=False).prefix_consistent is False


@pytest.mark.parametrize("loss_type", ["grpo", "sapo"])
def test_length_normalised_loss_types_warn(tmp_path, loss_type):
    with pytest.warns(UserWarning, match=rf"loss_type='{loss_type}' keeps TRL's per-completion weighting 1/\|o_i\|"):
        make_args(tmp_path, loss_type=loss_type)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        make_args(tmp_path, loss_type="uniform")


@pytest.mark.parametrize(
    "kw,needs",
    [
        (dict(top_entropy_quantile=0.5), "entropy mask"),
        (dict(entropy_coef=0.01), "entropy bonus"),
        (dict(use_adaptive_entropy=True), "entropy bonus"),
        (dict(use_vllm=True, loss_type="dapo", off_policy_mask_threshold=0.5), "sampler's log-probs"),
        (dict(cast_lm_head_to_fp32=True), "cast_lm_head_to_fp32"),
    ],
)
def test_triton_backend_refuses_what_needs_log_probs(tmp_path, kw, needs):
    with pytest.raises(ValueError, match=rf"loss_backend='triton'.*{needs}.*Set loss_backend='torch'"):
        make_args(tmp_path, loss_backend="triton", **kw)
    make_args(tmp_path, loss_backend="auto", **kw)  # 'auto' takes the torch path for them


def test_num_iterations_zero_refused(tmp_path):
    with pytest.raises(ValueError, match=r"num_iterations must be an int >= 1.*with 0 no step would ever run"):
        make_args(tmp_path, num_iterations=0)


def test_window_spanning_generation_batches_accepted(tmp_path):
    args = make_args(tmp_path, gradient_accumulation_steps=4, steps_per_generation=2)
    assert (args.gradient_accumulation_steps, args.steps_per_generation) == (4, 2)


# ------------------------------------------------------------------------------------------------
# optimizer options
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optim", ["adafactor", "adamw_8bit", "sgd"])
def test_other_optim_refused_naming_optimizer_adamw(tmp_path, optim):
    with pytest.raises(ValueError, match=rf"optim='{optim}' with optimizer='clip_aware_adamw'.*optimizer='adamw'"):
        make_args(tmp_path, optim=optim)
    assert make_args(tmp_path, optim=optim, optimizer="adamw").optim == optim


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_adamw_optims_accepted(tmp_path, optim):
    make_args(tmp_path, optim=optim)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(clip_aware_tau=-0.1), "tau"),
        (dict(clip_aware_tau=math.nan), "tau"),
        (dict(clip_aware_alpha_init=0.0), "alpha_init"),
        (dict(clip_aware_alpha_init=1.5), "alpha_init"),
        (dict(clip_aware_alpha_init=math.nan), "alpha_init"),
        (dict(learning_rate=-1.0), "lr"),
    ],
)
def test_clip_aware_settings_validated_at_construction(tmp_path, kw, name):
    """Validated by ClipAwareAdamW itself (its own messages), when the config is built: not when
    training starts."""
    with pytest.raises(ValueError, match=rf"ClipAwareAdamW settings .* are invalid: {name}\b"):
        make_args(tmp_path, **kw)


def test_user_optimizer_refused_at_init(tmp_path, tok):
    model = build_model(tok, seed=0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"given optimizer SGD while optimizer='clip_aware_adamw': pass optimizer='adamw'"
    ):
        make_trainer(tmp_path, tok, model=model, optimizers=(sgd, None))
    trainer = make_trainer(tmp_path, tok, model=model, optimizers=(sgd, None), optimizer="adamw", max_steps=1)
    trainer.train()
    assert trainer.optimizer.optimizer is sgd


def test_user_clip_aware_adamw_is_used(tmp_path, tok):
    model = build_model(tok, seed=0)
    opt = ClipAwareAdamW(model.parameters(), lr=1e-2, tau=0.3)
    trainer = make_trainer(tmp_path, tok, model=model, optimizers=(opt, None), max_steps=2)
    trainer.train()
    assert trainer.clip_aware_optimizer() is opt
    assert "grpo_fix/kappa" in trainer.state.log_history[0]


def test_user_optimizer_class_refused_at_create_optimizer(tmp_path, tok):
    trainer = make_trainer(tmp_path, tok)
    trainer.optimizer_cls_and_kwargs = (torch.optim.SGD, {"lr": 0.1})
    with pytest.raises(ValueError, match=r"given optimizer SGD while optimizer='clip_aware_adamw'"):
        trainer.create_optimizer()
    trainer.optimizer_cls_and_kwargs = (ClipAwareAdamW, {"lr": 1e-3, "tau": 0.2})
    assert trainer.create_optimizer().tau == 0.2


def test_user_clip_aware_instance_refused_under_deepspeed(tmp_path, tok):
    pytest.importorskip("deepspeed")
    model = build_model(tok, seed=0)
    opt = ClipAwareAdamW(model.parameters())
    with pytest.raises(ValueError, match=r"under DeepSpeed: transformers would drop the instance.*optimizer_cls_and"):
        make_trainer(tmp_path, tok, model=model, optimizers=(opt, None), deepspeed=DS_BASE)


# ------------------------------------------------------------------------------------------------
# DeepSpeed and accelerate configs
# ------------------------------------------------------------------------------------------------
def test_deepspeed_optimizer_block_refused(tmp_path):
    cfg = dict(DS_BASE, optimizer={"type": "AdamW", "params": {"lr": 1e-5}})
    with pytest.raises(ValueError, match=r"Remove the 'optimizer' block"):
        make_args(tmp_path, deepspeed=cfg)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'optimizer' block"):
        make_args(tmp_path, deepspeed=str(path))


def test_deepspeed_offload_without_flag_refused(tmp_path):
    cfg = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(ValueError, match=r'"zero_force_ds_cpu_optimizer": false'):
        make_args(tmp_path, deepspeed=cfg)


def test_accelerate_yaml_offload_refused_with_a_yaml_fix(tmp_path, monkeypatch):
    """``accelerate launch`` with a YAML that offloads the optimizer sets these variables; the
    error names the route a YAML can express (``deepspeed_config_file``)."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(ValueError, match=r"accelerate YAML cannot carry.*deepspeed_config_file"):
        make_args(tmp_path)
    # the fix: the same settings in a JSON file with the key, named by deepspeed_config_file
    path = tmp_path / "ds.json"
    zero = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    path.write_text(json.dumps({"zero_optimization": zero, "zero_force_ds_cpu_optimizer": False}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    make_args(tmp_path)


def test_backtrack_under_zero_refused(tmp_path):
    with pytest.raises(ValueError, match="clip_aware_backtrack=False"):
        make_args(tmp_path, clip_aware_backtrack=True, deepspeed=DS_BASE)
    make_args(tmp_path, clip_aware_backtrack=True, deepspeed=dict(DS_BASE, zero_optimization={"stage": 0}))


# ------------------------------------------------------------------------------------------------
# trainer construction
# ------------------------------------------------------------------------------------------------
def test_plain_grpo_config_refused(tmp_path, tok):
    plain = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    with pytest.raises(TypeError, match="GRPOFixConfig"):
        GRPOFixTrainer(
            model=build_model(tok),
            reward_funcs=reward_len,
            args=plain,
            train_dataset=build_dataset(),
            processing_class=tok,
        )


def test_triton_backend_needs_cuda_or_the_interpreter(tmp_path, tok, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"the model is not on CUDA.*Set loss_backend='torch'"):
        make_trainer(tmp_path, tok, loss_backend="triton")


# ------------------------------------------------------------------------------------------------
# TRL version range
# ------------------------------------------------------------------------------------------------
def test_trl_version_range():
    check_trl_version("1.16.0")
    check_trl_version("1.16.3")
    with pytest.raises(ImportError, match=r"needs trl >= 1.16.*found trl 1.13.0.*pip install 'trl>=1.16,<1.17'"):
        check_trl_version("1.13.0")
    with pytest.warns(UserWarning, match=r"tested with trl 1.16.x.*found trl 1.17.0"):
        check_trl_version("1.17.0")
