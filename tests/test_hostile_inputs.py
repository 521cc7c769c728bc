"""Hostile inputs against every public entry point of the loss room and the kernels, on each backend.

The contract (README, Reliability): bad input gives a ``ValueError``/``TypeError`` naming the
problem, or a finite, correct result; garbage at masked positions changes nothing.  One table of
entry points (:data:`ENTRIES`, one line each) and one set of mutations drawn by hypothesis
(:mod:`strategies`):

- ``masked``: NaN/inf/huge values at masked positions of a float input -> the same finite result
  as the clean call;
- ``valid``: the same at valid positions -> an error naming the input, or a finite result;
- ``shape`` / ``dtype`` / ``not_tensor``: an error (``not_tensor`` names the argument);
- ``ids``: a token id outside ``[0, V)`` at a valid position -> an error naming ``completion_ids``.

A new entry point is covered by adding one line to :data:`ENTRIES`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import SPECIAL_FLOATS, poisoned

import grpo_fix
from grpo_fix import PRESETS
from grpo_fix.kernels import (
    linear_logprob_reference,
    linear_logprobs,
    selective_logprob,
    selective_logprob_nograd,
    selective_logprob_reference,
)

EXAMPLES = int(os.environ.get("GRPO_FIX_HYPOTHESIS_EXAMPLES", "60")) // 3


@dataclass(frozen=True)
class Case:
    """Valid inputs of the loss family; mutations replace one field."""

    logits: torch.Tensor
    logp: torch.Tensor
    hidden: torch.Tensor
    weight: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    old: torch.Tensor
    ref: torch.Tensor
    adv: torch.Tensor
    rewards: torch.Tensor
    is_ratio: torch.Tensor
    preset: str
    G: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    G = draw(st.sampled_from([1, 2, 3]))
    B, T, V, H = G * draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(2, 9)), 4
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[0, 0] = True
    if T > 1:
        mask[0, -1] = False  # at least one masked position
    ids = torch.randint(0, V, (B, T), generator=g)
    logits = 2 * torch.randn(B, T, V, generator=g)
    lp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    rewards = torch.randn(B, generator=g)
    return Case(
        logits=logits,
        logp=lp,
        hidden=torch.randn(B, T, H, generator=g),
        weight=0.5 * torch.randn(V, H, generator=g),
        ids=ids,
        mask=mask,
        old=lp + 0.1 * torch.randn(B, T, generator=g),
        ref=lp - 0.1 * torch.rand(B, T, generator=g),
        adv=grpo_fix.group_advantages(rewards, G),
        rewards=rewards,
        is_ratio=0.5 + torch.rand(B, T, generator=g),
        preset=draw(st.sampled_from(sorted(PRESETS))),
        G=G,
    )


def leaf(x):
    """``x`` as a gradient leaf when it can be one (a hostile input reaches the library untouched)."""
    return x.clone().requires_grad_(True) if isinstance(x, torch.Tensor) and x.dtype.is_floating_point else x


def _loss(out: grpo_fix.SurrogateOutput, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
    grads = torch.autograd.grad(out.loss, [x for x in leaves if x.requires_grad], allow_unused=True)
    return (out.loss.detach(), *(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)))


def _cfg(c: Case) -> grpo_fix.SurrogateConfig:
    return PRESETS[c.preset].replace(beta=0.05)


def surrogate(c: Case) -> tuple[torch.Tensor, ...]:
    lp = leaf(c.logp)
    return _loss(
        grpo_fix.surrogate_loss(
            _cfg(c), lp, c.old, c.adv, c.mask, group_size=c.G, completion_ids=c.ids, ref_logp=c.ref, is_ratio=c.is_ratio
        ),
        lp,
    )


def from_logits(backend: str) -> Callable[[Case], tuple[torch.Tensor, ...]]:
    def run(c: Case) -> tuple[torch.Tensor, ...]:
        z = leaf(c.logits)
        out = grpo_fix.logits_surrogate_loss(
            _cfg(c),
            z,
            c.ids,
            c.old,
            c.adv,
            c.mask,
            group_size=c.G,
            ref_logp=c.ref,
            is_ratio=c.is_ratio,
            backend=backend,
            inplace_backward=False,
        )
        return _loss(out, z)

    return run


def from_hidden(backend: str) -> Callable[[Case], tuple[torch.Tensor, ...]]:
    def run(c: Case) -> tuple[torch.Tensor, ...]:
        h, w = leaf(c.hidden), leaf(c.weight)
        out = grpo_fix.linear_surrogate_loss(
            _cfg(c),
            h,
            w,
            c.ids,
            c.old,
            c.adv,
            c.mask,
            group_size=c.G,
            ref_logp=c.ref,
            is_ratio=c.is_ratio,
            backend=backend,
            chunk_tokens=3,
        )
        return _loss(out, h, w)

    return run


def logprob_fn(fn: Callable, linear: bool = False) -> Callable[[Case], tuple[torch.Tensor, ...]]:
    def run(c: Case) -> tuple[torch.Tensor, ...]:
        if linear:
            return (fn(c.hidden, c.weight, c.ids, c.mask),)
        z = leaf(c.logits)
        lp = fn(z, c.ids, c.mask)
        if not lp.requires_grad:
            return (lp,)
        (g,) = torch.autograd.grad((lp * c.mask).sum(), z)
        return lp.detach(), g

    return run


def advantages(c: Case) -> tuple[torch.Tensor, ...]:
    return (grpo_fix.group_advantages(c.rewards, c.G),)


def prefix_adv(c: Case) -> tuple[torch.Tensor, ...]:
    return (grpo_fix.prefix_consistent_advantages(c.ids, c.adv, c.G, c.mask),)


#: entry point -> (the call, the inputs it reads); one line per entry point
ENTRIES: dict[str, tuple[Callable[[Case], tuple[torch.Tensor, ...]], tuple[str, ...]]] = {
    "surrogate_loss": (surrogate, ("logp", "old", "ref", "adv", "mask", "is_ratio", "ids")),
    "logits_surrogate_loss[torch]": (from_logits("torch"), ("logits", "old", "ref", "adv", "mask", "ids", "is_ratio")),
    "logits_surrogate_loss[triton]": (from_logits("triton"), ("logits", "old", "ref", "adv", "mask", "ids")),
    "linear_surrogate_loss[torch]": (from_hidden("torch"), ("hidden", "weight", "old", "ref", "adv", "mask", "ids")),
    "linear_surrogate_loss[triton]": (from_hidden("triton"), ("hidden", "weight", "old", "adv", "mask", "ids")),
    "selective_logprob": (logprob_fn(selective_logprob), ("logits", "ids", "mask")),
    "selective_logprob_nograd": (logprob_fn(selective_logprob_nograd), ("logits", "ids", "mask")),
    "selective_logprob_reference": (logprob_fn(selective_logprob_reference), ("logits", "ids", "mask")),
    "linear_logprobs": (logprob_fn(linear_logprobs, linear=True), ("hidden", "weight", "ids", "mask")),
    "linear_logprob_reference": (
        logprob_fn(linear_logprob_reference, linear=True),
        ("hidden", "weight", "ids", "mask"),
    ),
    "group_advantages": (advantages, ("rewards",)),
    "prefix_consistent_advantages": (prefix_adv, ("ids", "adv", "mask")),
}
#: entry points whose ids are token ids into a vocabulary (elsewhere ids are only labels)
VOCAB_FREE = {"prefix_consistent_advantages", "surrogate_loss"}
#: inputs whose positions follow the (B, T) mask (the rest: masked positions do not exist)
TOKEN_INPUTS = {"logits", "logp", "hidden", "old", "ref", "is_ratio", "ids"}
FLOAT_INPUTS = {"logits", "logp", "hidden", "weight", "old", "ref", "adv", "rewards", "is_ratio"}
#: float inputs that must not be integers (rewards and weights like is_ratio may be, documented)
FLOAT_ONLY = {"logits", "logp", "hidden", "weight", "old", "ref", "adv"}
#: integer inputs an entry point documents as accepted
INTS_OK = {"prefix_consistent_advantages": {"adv"}}


@dataclass(frozen=True)
class Mutation:
    kind: str  # masked | valid | shape | dtype | not_tensor | ids
    field: str
    case: Case


@st.composite
def mutations(
    draw: st.DrawFn, inputs: tuple[str, ...], vocab: bool = True, ints_ok: frozenset[str] = frozenset()
) -> tuple[Case, Mutation]:
    c = draw(cases())
    field = draw(st.sampled_from(inputs))
    kinds = ["shape", "not_tensor"]
    if field in FLOAT_INPUTS:
        kinds.append("valid")
    if field in FLOAT_ONLY and field not in ints_ok:
        kinds.append("dtype")
    if field in TOKEN_INPUTS and field != "ids" and (~c.mask).any():
        kinds.append("masked")
    if field == "ids":
        kinds += ["ids", "masked"] if vocab else ["masked"]
    kind = draw(st.sampled_from(kinds))
    value = getattr(c, field)
    if kind in ("masked", "valid"):
        where = c.mask if kind == "valid" else ~c.mask
        if field == "ids":  # -100 where the row has ended (masked positions inside a row are context)
            new = value.clone()
            ended = c.mask.flip(1).cumsum(1).flip(1) == 0
            new[ended] = -100
        else:
            at = None  # a whole-tensor input (weight, advantages, rewards): any element
            if field in TOKEN_INPUTS:
                at = where[..., None].expand_as(value) if value.dim() == 3 else where.expand_as(value)
            new = draw(poisoned(value, at=at, values=SPECIAL_FLOATS))
    elif kind == "ids":
        new = value.clone()
        b, t = c.mask.nonzero()[0]
        new[b, t] = draw(st.sampled_from([-1, value.max().item() + 1000, c.logits.shape[-1]]))
    elif kind == "shape":  # three times the time axis (H for the weight); 1-D inputs get two more dims
        new = value[:, None, None] if value.dim() == 1 else torch.cat([value] * 3, 1)
    elif kind == "dtype":
        new = value.to(torch.int64)
    else:
        new = value.tolist()
    return c, Mutation(kind, field, replace(c, **{field: new}))


def _call(fn: Callable, c: Case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(c)


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_hostile_inputs(entry):
    fn, inputs = ENTRIES[entry]
    slow = "triton" in entry or entry in ("selective_logprob", "selective_logprob_nograd", "linear_logprobs")

    @settings(
        max_examples=max(6, EXAMPLES // (3 if slow else 1)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(mutations(inputs, vocab=entry not in VOCAB_FREE, ints_ok=frozenset(INTS_OK.get(entry, ()))))
    def check(drawn):
        clean, m = drawn
        try:
            out = _call(fn, m.case)
        except (ValueError, TypeError) as e:
            assert m.kind not in ("masked",), f"{entry}: garbage at masked positions of {m.field} raised {e!r}"
            if m.kind == "not_tensor":
                assert m.field in str(e) or "completion_ids" in str(e) or "ids" in str(e), str(e)
            if m.kind == "ids":
                assert "completion_ids" in str(e) or "ids" in str(e), str(e)
            return
        assert m.kind in ("masked", "valid"), f"{entry}: {m.kind} {m.field} was accepted"
        for t in out:
            assert torch.isfinite(t).all(), f"{entry}: non-finite output for {m.kind} {m.field}"
        if m.kind == "masked":
            ref = _call(fn, clean)
            for a, b in zip(out, ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    check()
