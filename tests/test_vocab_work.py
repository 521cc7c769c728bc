"""The vocabulary paths do no more work than the loss needs (issue 16, items 3 and 4).

- Logits-free path: tokens whose upstream gradient is known to be zero before any GEMM (zero
  advantage, no KL term: every group whose rewards are all equal) get no GEMM at all; the GEMM
  FLOPs are counted with a ``TorchDispatchMode`` and the gradients still equal the oracle's.
- Torch reference of the logits path: with bf16 logits its peak memory beyond the logits is at
  most 2x the logits bytes (tensor allocations tracked by a ``TorchDispatchMode``).
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grpo_fix import PRESETS, Window, group_advantages, linear_surrogate_loss, logits_surrogate_loss, surrogate_loss
from grpo_fix.kernels import dw_accumulation
from grpo_fix.kernels.reference import selective_logprob_reference

GEMMS = {"mm", "addmm", "addmm_"}


class GemmFlops(TorchDispatchMode):
    """2 m n k per ``mm`` / ``addmm`` dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in GEMMS:
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


class PeakBytes(TorchDispatchMode):
    """Peak bytes of the tensors allocated inside the mode and still alive (views share storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def eight_groups(seed: int = 0, zero_groups: int = 3, G: int = 4, T: int = 6, V: int = 40, H: int = 8):
    g = torch.Generator().manual_seed(seed)
    B = 8 * G
    rewards = torch.rand(B, generator=g)
    for k in range(zero_groups):  # all rewards equal: advantage exactly 0 for the whole group
        rewards[k * G : (k + 1) * G] = 0.5
    mask = torch.rand(B, T, generator=g) < 0.85
    mask[:, 0] = True
    return dict(
        hidden=torch.randn(B, T, H, generator=g),
        weight=0.3 * torch.randn(V, H, generator=g),
        ids=torch.randint(0, V, (B, T), generator=g),
        adv=group_advantages(rewards, G),
        mask=mask,
        G=G,
    )


@pytest.mark.parametrize("preset", ["uniform", "dapo", "grpo", "gspo"])
def test_zero_advantage_groups_cost_no_gemm_and_gradients_match(preset):
    d = eight_groups()
    cfg = PRESETS[preset]
    live = d["mask"] & (d["adv"] != 0)[:, None]
    assert int(live.sum()) < int(d["mask"].sum())
    V, H = d["weight"].shape
    h, w = d["hidden"].clone().requires_grad_(True), d["weight"].clone().requires_grad_(True)
    counter = GemmFlops()
    with counter:
        out = linear_surrogate_loss(
            cfg,
            h,
            w,
            d["ids"],
            None,
            d["adv"],
            d["mask"],
            group_size=d["G"],
            backend="triton",
            chunk_tokens=16,
            window=Window(tokens=int(d["mask"].sum())),
        )
    # three GEMMs (logits, dX, dW) over the live tokens only: 3 of 8 groups cost nothing
    assert counter.flops == 3 * 2 * int(live.sum()) * V * H
    skipped = 3 * 2 * int((d["mask"] & ~live).sum()) * V * H
    assert skipped > 0
    out.loss.backward()
    hr, wr = d["hidden"].clone().requires_grad_(True), d["weight"].clone().requires_grad_(True)
    lp = torch.log_softmax(hr @ wr.T, -1).gather(-1, d["ids"][..., None]).squeeze(-1)
    ref = surrogate_loss(
        cfg,
        lp,
        None,
        d["adv"],
        d["mask"],
        group_size=d["G"],
        completion_ids=d["ids"],
        window=Window(tokens=int(d["mask"].sum())),
    )
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-5, atol=1e-7)
    assert (h.grad[~live] == 0).all()


def test_a_kl_term_keeps_every_token():
    """With a KL term every valid token's loss depends on its log-prob: nothing is skipped."""
    d = eight_groups()
    V, H = d["weight"].shape
    ref = torch.full(d["mask"].shape, -3.0)
    counter = GemmFlops()
    with counter:
        linear_surrogate_loss(
            PRESETS["dapo"].replace(beta=0.1),
            d["hidden"].requires_grad_(True),
            d["weight"],
            d["ids"],
            None,
            d["adv"],
            d["mask"],
            group_size=None,
            ref_logp=ref,
            backend="triton",
        )
    assert counter.flops == 2 * 2 * int(d["mask"].sum()) * V * H  # frozen weight: no dW GEMM


def test_dw_accumulation_mode_is_reported():
    assert dw_accumulation("cpu", torch.float32) == "fp32"
    assert dw_accumulation("cpu", torch.bfloat16) == "16-bit product + fp32 add"


@pytest.mark.parametrize("backend", ["torch"])
def test_bf16_logits_path_peak_memory_at_most_twice_the_logits(backend):
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 64, 4096
    logits = (2 * torch.randn(B, T, V, generator=g)).bfloat16().requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    old = torch.full((B, T), -8.0)
    adv = torch.randn(B, generator=g)
    logits_bytes = logits.numel() * logits.element_size()
    meter = PeakBytes()
    with meter:
        out = logits_surrogate_loss(
            "uniform", logits, ids, old, adv, mask, group_size=None, backend=backend, temperature=0.9
        )
        out.loss.backward()
    assert torch.isfinite(logits.grad.float()).all()
    assert meter.peak <= 2 * logits_bytes, f"peak {meter.peak / logits_bytes:.2f}x the logits bytes"
    # the old path, log_softmax(logits.float() / T) with autograd, for scale
    meter_old = PeakBytes()
    with meter_old:
        lp = torch.log_softmax(logits.float() / 0.9, -1).gather(-1, ids[..., None]).squeeze(-1)
        lp.sum().backward()
    assert meter_old.peak > 2 * logits_bytes
    torch.testing.assert_close(
        selective_logprob_reference(logits.detach(), ids, mask, 0.9), lp.detach(), rtol=1e-5, atol=1e-5
    )
