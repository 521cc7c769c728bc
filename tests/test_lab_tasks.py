"""The lab's tasks and GRPO loop: task 2's language and pretraining cache, the loop's measurements
(micro-batching through Window + SignalAccumulator changes nothing, batch-end re-score, lengths,
shared-prefix share), the excess-guard prototype, and the lab's hygiene (no import-time side effects)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from grpo_fix import TrustRegionSignal  # noqa: E402
from grpo_fix.lab import arith  # noqa: E402
from grpo_fix.lab.experiments.baselines import ExcessGuard, make_optimizer  # noqa: E402
from grpo_fix.lab.experiments.loop import RunConfig, train, whole_group_prefix_share  # noqa: E402
from grpo_fix.lab.experiments.tasks import Completions  # noqa: E402

TINY_ARITH = {"hidden_size": 32, "num_layers": 1, "pretrain_steps": 20, "eval_problems": 40}


def test_arith_language_reward_ignores_the_tail_and_split_is_disjoint():
    assert arith.solve("07+58=") == 65 and arith.prompt_of(7, 58) == "07+58="
    assert arith.answer_reward("07+58=", "65;....") == 1.0 == arith.answer_reward("07+58=", "65;")
    assert arith.answer_reward("07+58=", "65") == 1.0  # no tail at all
    assert arith.answer_reward("07+58=", "56;") == 0.0 == arith.answer_reward("07+58=", "650;")
    cfg = arith.ArithConfig(**TINY_ARITH)
    train_pool, held = arith.split_problems(cfg)
    assert len(held) == 40 and not set(train_pool) & set(held) and len(train_pool) + 40 == 100 * 100
    rng = random.Random(0)
    docs = [arith.document_completion("99+99=", rng, cfg) for _ in range(400)]
    answers = [d.split(";")[0] for d in docs]
    assert all(set(d.split(";")[1]) <= {"."} and len(d.split(";")[1]) <= cfg.tail_max for d in docs)
    right = answers.count("198") / len(docs)
    assert abs(right - (1 - cfg.noise)) < 0.1 and set(answers) <= {"198", "188", "197", "199", "208"}
    wrong_small = {arith.document_completion("00+03=", rng, cfg).split(";")[0] for _ in range(200)} - {"3"}
    assert wrong_small == {"2", "4", "13"}  # 3 - 10 < 0 is reflected to 3 + 10, never back onto the answer
    with pytest.raises(ValueError, match="max_operand"):
        arith.ArithConfig(max_operand=100)


def test_arith_pretraining_is_cached_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_FIX_CACHE", str(tmp_path))
    cfg = arith.ArithConfig(**TINY_ARITH)
    first, stats = arith.pretrained_policy(cfg)
    assert (tmp_path / f"arith-{cfg.key()}.pt").exists() and stats["pretrain_loss"] > 0
    again, _ = arith.pretrained_policy(cfg)  # from the cache
    fresh, _ = arith.pretrain(cfg)  # trained again from scratch
    for a, b, c in zip(first.parameters(), again.parameters(), fresh.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_micro_batches_change_nothing_and_every_step_is_recorded():
    """Window + SignalAccumulator over 2 micro-batches of whole groups = the whole batch in one call."""
    base = dict(optimizer="clip_aware", rollouts=3, inner_steps=3, lr=1e-2, seed=5)
    one, two = train(RunConfig(**base)), train(RunConfig(**base, micro_batches=2))
    assert one.rewards == two.rewards
    s1, s2 = one.summary(), two.summary()
    for key in ("overshoot_step", "overshoot_end", "max_excess_end", "alpha_mean", "prefix_share"):
        assert s1[key] == pytest.approx(s2[key], rel=1e-4, abs=1e-6), key
    assert len(one.steps) == 9 and len(one.rollouts) == 3
    with pytest.raises(ValueError, match="micro_batches"):
        RunConfig(micro_batches=3)


def test_onpolicy_steps_do_not_overshoot_but_batch_end_sees_the_move():
    res = train(RunConfig(optimizer="adamw", inner_steps=1, rollouts=3, lr=5e-2, seed=3))
    s = res.summary()
    assert s["overshoot_step"] == 0.0 and s["max_excess_step"] == 0.0
    assert s["outside_end"] > 0.0  # one large step moved ratios out of the clip range


def test_lengths_are_split_by_correctness_on_binary_tasks():
    res = train(RunConfig(task="toy_first", rollouts=2, inner_steps=1, lr=1e-2, seed=0))
    for rec in res.rollouts:
        assert rec["n_correct"] >= 0 and (rec["len_correct"] != rec["len_correct"] or 1 <= rec["len_correct"] <= 12)
    assert train(RunConfig(task="toy", rollouts=1, inner_steps=1)).summary()["len_correct"] != 0.0  # NaN: not binary


def test_whole_group_prefix_share_counts_only_prefixes_the_whole_group_shares():
    # group of 2: rows share token 0 and 1; row 1 diverges at token 2; a second group shares nothing
    completion = torch.tensor([[5, 6, 7, 1], [5, 6, 8, 1], [5, 9, 1, 0], [6, 9, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    batch = Completions(completion, completion, 0, completion, mask, [""] * 4)
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    mass, tokens = whole_group_prefix_share(batch, adv, 2)
    assert tokens == pytest.approx(4 / 14)  # 2 tokens x 2 rows of group 1
    assert mass == pytest.approx(4 * 1.0 / (8 * 1.0 + 6 * 2.0))


def test_excess_guard_shrinks_only_on_large_excursions():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer("clip_aware_guard", [p], lr=0.1)
    assert isinstance(opt, ExcessGuard)

    def signal(excess: float) -> TrustRegionSignal:
        z = TrustRegionSignal.zeros()
        one = torch.ones((), dtype=torch.float64)
        return TrustRegionSignal(one, one, 10 * one, 10 * one, z.num_clipped, z.num_overshoot, excess * one)

    opt.observe(signal(0.5))
    assert opt.alpha == 1.0 and opt.param_groups[0]["lr"] == pytest.approx(0.1)
    opt.observe(signal(3.0))
    assert opt.alpha == 0.5 and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.observe(signal(0.0))
    assert opt.alpha == pytest.approx(0.625)


def test_lab_modules_have_no_import_time_side_effects():
    """Importing any lab module leaves the environment and the global RNG alone."""
    modules = [
        "grpo_fix.lab.toy",
        "grpo_fix.lab.arith",
        "grpo_fix.lab.demo",
        *(
            f"grpo_fix.lab.experiments.{m}"
            for m in ("loop", "tasks", "fair", "length_bias", "overshoot", "prefix_bias", "reward_scale")
        ),
    ]
    code = (
        "import os, sys, torch; before = dict(os.environ); state = torch.random.get_rng_state()\n"
        f"import importlib; [importlib.import_module(m) for m in {modules!r}]\n"
        "changed = sorted(k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k))\n"
        "assert not changed, changed\n"
        "assert torch.equal(state, torch.random.get_rng_state()), 'global RNG consumed'\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("name", "limit", "gate"),
    [("clip_aware_guard", 1.3863, True), ("guard16", 2.7726, True), ("guard16_nogate", 2.7726, False)],
)
def test_guard_variants_set_their_limit_and_gate(name, limit, gate):
    opt = make_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert isinstance(opt, ExcessGuard)
    assert (opt.excess_limit, opt.gate, opt.controller) == (limit, gate, False)
