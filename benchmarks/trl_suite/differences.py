"""Root causes, by test id, of every outcome that differs between the stock and swapped runs (``DIFFERENCES``:
test -> (category, cause)) and of every failure common to both (``BOTH``: test -> cause).

A difference missing here is reported as "unexplained" with the swap's error message, so a new one cannot
hide. Categories: "intended" (the test asserts TRL behaviour the swap changes on purpose), "adapter" (the
adapter is wrong or lacks the feature), "harness" (the tiny local models, not the product).
"""

from __future__ import annotations

DIFFERENCES: dict[str, tuple[str, str]] = {
    "TestGRPOTrainer::test_warning_raised_sequence_level_with_token_summed_loss[cispo]": (
        "intended",
        "TRL warns about cispo with importance_sampling_level='sequence' and trains; the swap refuses the "
        "combination when the trainer is built (a sequence IS weight times token log-probs is not a "
        "configuration of the unified surrogate), naming importance_sampling_level='token' or trl.GRPOTrainer",
    ),
    "TestGRPOTrainer::test_train_sequence_importance_sampling": (
        "intended",
        "the test keeps the default loss_type, which is 'uniform' with the swap; uniform refuses sequence-level "
        "ratios (they differ across completions that share a prefix and break Prop. 1's cancellation), naming "
        "importance_sampling_level='token' or loss_type='grpo' (GSPO) / 'dapo'",
    ),
}

# The test file is TRL's main branch at 1.10.0.dev0 (the newest commit of the public snapshot), run against the
# 1.16.0 wheel: these tests assert 1.10-era internals that 1.16.0 changed, and fail with stock TRL too.
SNAPSHOT_DRIFT = "test snapshot (TRL main, 1.10.0.dev0) vs the 1.16.0 wheel: "
BOTH: dict[str, str] = {
    "TestGRPORolloutDispatch::test_generate_prefers_rollout_func": SNAPSHOT_DRIFT
    + "the test builds the trainer with object.__new__ and sets the attributes 1.10's _generate reads; 1.16's "
    "_generate also reads self.eos_token_ids (set in 1.16's __init__)",
    "TestGRPORolloutDispatch::test_generate_rollout_func_syncs_vllm_weights_when_needed": SNAPSHOT_DRIFT
    + "as above (self.eos_token_ids)",
    "TestGRPOTrainer::test_liger_kernel_with_peft_prompt_learning_raises": SNAPSHOT_DRIFT
    + "1.16 no longer has the Liger GRPO loss (use_liger_kernel only applies Liger's layer kernels), so the "
    "prompt-learning guard it asserts is gone",
    "TestGRPOTrainer::test_train_moe_peft_model": SNAPSHOT_DRIFT
    + "with peft >= 0.20 (0.21.2 here) 1.16 adds the frozen 'ref' adapter next to a target_parameters LoRA "
    "(peft#3350); the 1.10 regression test asserts it is absent",
    "TestGRPOTrainer::test_entropy_bonus_flows_gradients": SNAPSHOT_DRIFT
    + "1.16 computes entropies in its fused LM head, which keeps them in the graph even with the bonus off; the "
    "test asserts they are detached then",
}
