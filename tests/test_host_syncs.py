"""Where the loss entry points wait for the GPU (host syncs), checked on CPU.

A host sync in the middle of the forward makes the CPU wait for the kernels queued so far and
only then launch the 130-200 small ops of the GRPO math, with the GPU idle meanwhile.  So:

- ``surrogate_loss``: one sync (the value checks), and it is the last op of the forward;
- the logits kernel path: what must sync and does not depend on the log-probs (finding the prefix
  classes with ``torch.unique``) runs before the kernel launch; after it, only the final check;
- no backward syncs.

The ops are recorded with a ``TorchDispatchMode``; an op counts as a sync when it would block the
host on CUDA (data-dependent output sizes, reading a value).  The kernels' own work (the Triton
interpreter's bookkeeping on CPU) is not recorded, only where they start.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_kernels import cfg_for, make_batch, oracle_logp
from torch.utils._python_dispatch import TorchDispatchMode

import grpo_fix.kernels.logprob as logprob_mod
from grpo_fix import surrogate_loss
from grpo_fix.kernels import logits_surrogate_loss

SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "unique_dim",
    "_unique2",
    "unique_consecutive",
    "masked_select",
    "is_nonzero",
    "equal",
    "item",
}
KERNEL = "<kernel>"


class OpLog(TorchDispatchMode):
    """Names of the dispatched ops, ``KERNEL`` where a kernel starts, and which ops sync."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = func.overloadpacket.__name__
            bool_index = name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
            )
            self.ops.append("SYNC:" + name if name in SYNC_OPS or bool_index else name)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def kernel(self):
        self.ops.append(KERNEL)
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def syncs(self) -> list[int]:
        return [i for i, op in enumerate(self.ops) if op.startswith("SYNC:")]


@pytest.fixture
def oplog(monkeypatch):
    log = OpLog()
    for name in ("logprob_forward", "logprob_backward"):
        original = getattr(logprob_mod, name)

        def wrapped(*args, _original=original, **kwargs):
            with log.kernel():
                return _original(*args, **kwargs)

        monkeypatch.setattr(logprob_mod, name, wrapped)
    return log


@pytest.mark.parametrize("name,beta", [("dapo", 0.0), ("gspo", 0.0), ("grpo_r1", 0.04)])
def test_surrogate_loss_syncs_once_at_the_end(name, beta):
    d = make_batch(seed=1)
    lp = oracle_logp(d["logits"], d["ids"]).detach().requires_grad_(True)
    with OpLog() as log:
        out = surrogate_loss(
            cfg_for(name, beta), lp, d["old"], d["adv"], d["mask"], group_size=None, ref_logp=d["ref"] if beta else None
        )
    assert log.syncs() == [len(log.ops) - 1], log.ops
    with OpLog() as log:
        out.loss.backward()
    assert log.syncs() == [], log.ops


def test_logits_path_syncs_only_before_the_kernel_and_at_the_end(oplog):
    d = make_batch(seed=2)
    z = d["logits"].clone().requires_grad_(True)
    with oplog:
        out = logits_surrogate_loss(
            cfg_for("uniform", 0.05),
            z * 1,
            d["ids"],
            d["old"],
            d["adv"],
            d["mask"],
            group_size=d["G"],
            ref_logp=d["ref"],
            compile_math=False,
        )
    ops = oplog.ops
    launch = ops.index(KERNEL)
    syncs = oplog.syncs()
    assert any("unique" in ops[i] for i in syncs if i < launch), "prefix classes were not found before the launch"
    assert [i for i in syncs if i > launch] == [len(ops) - 1], ops[launch:]
    assert ops.count(KERNEL) == 1
    oplog.ops.clear()
    with oplog:
        out.loss.backward()
    assert oplog.syncs() == [] and KERNEL in oplog.ops, oplog.ops


def test_value_errors_still_raised_after_the_math():
    """Reading the checks last changes nothing for the caller: bad input still raises, no output."""
    d = make_batch(seed=3)
    lp = oracle_logp(d["logits"], d["ids"]).detach().requires_grad_(True)
    old = d["old"].clone()
    old[0, 0] = float("nan")
    with pytest.raises(ValueError, match="old_logp has NaN/inf at valid"):
        surrogate_loss(cfg_for("dapo", 0.0), lp, old, d["adv"], d["mask"], group_size=None)
    with pytest.raises(ValueError, match="num_window_tokens is smaller.*"):
        surrogate_loss(cfg_for("uniform", 0.0), lp, d["old"], d["adv"], d["mask"], group_size=None, num_window_tokens=1)


# ------------------------------------------------------------------------------------------------
# eager op counts per loss call (what a GPU launches when the math is not compiled)
# ------------------------------------------------------------------------------------------------
#: Upper bounds on eager ops per call, forward + backward, on (B, T) log-probs with old and ref-free
#: presets.  TRL 1.16's own ``_compute_loss`` dispatches 125 for the same loss and metrics
#: (``benchmarks/results/loss_cpu.md``); the bounds keep ours below it.
OPS_BOUND = {"dapo": 120, "grpo": 122, "uniform": 120}


@pytest.mark.parametrize("name", sorted(OPS_BOUND))
def test_eager_ops_per_loss_call_stay_below_trl(name):
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("opcount", bench / "opcount.py")
        opcount = importlib.util.module_from_spec(spec)
        sys.modules["opcount"] = opcount
        spec.loader.exec_module(opcount)
    finally:
        sys.path.remove(str(bench))
    g = torch.Generator().manual_seed(0)
    B, T = 16, 32
    logp = -torch.rand(B, T, generator=g)
    old = (logp + 0.05 * torch.randn(B, T, generator=g)).clamp_max(0)
    adv, mask = torch.randn(B, generator=g), torch.rand(B, T, generator=g) < 0.9
    leaf = logp.clone().requires_grad_(True)
    fwd, bwd = opcount.count_forward_backward(
        lambda: surrogate_loss(cfg_for(name, 0.0), leaf, old, adv, mask, group_size=None, compile_math="never").loss
    )
    assert fwd.ops + bwd.ops <= OPS_BOUND[name], (fwd.ops, bwd.ops, fwd.names)
    assert fwd.syncs == 1 and bwd.syncs == 0
    leaf.grad = None
    fwd, bwd = opcount.count_forward_backward(
        lambda: (
            surrogate_loss(
                cfg_for(name, 0.0), leaf, old, adv, mask, group_size=None, compile_math="never", checks="deferred"
            ).loss
        )
    )
    assert fwd.syncs == 0 and bwd.syncs == 0
