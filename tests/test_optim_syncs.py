"""How often one ClipAwareAdamW step waits for the device, and how many kernels it launches.

Host syncs are counted with a ``TorchDispatchMode`` on CPU: an op that reads a tensor's value on
the host (``_local_scalar_dense`` behind ``bool()`` / ``float()`` / ``item()``, data-dependent
shapes) would block the host on CUDA.  Reads of the step counters are listed apart: torch's
single-tensor and foreach AdamW keep them on the host (reading them costs no sync), the Triton
path keeps them on the device and never reads them.

- torch paths (single-tensor, foreach, fused): one read per step, the non-finite check's answer;
- Triton path (``backend="triton"``, through the interpreter on CPU): no read at all; a
  non-finite gradient is skipped on the device and counted when ``skipped_steps`` is read;
  launches per step: one check over every gradient plus one update per param group.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grpo_fix import ClipAwareAdamW, TrustRegionSignal
from grpo_fix.kernels import adamw_step as adamw_mod

SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "unique_dim", "_unique2", "masked_select"}
TRITON = pytest.mark.skipif(
    not adamw_mod.triton_available() or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton with CUDA or TRITON_INTERPRET=1",
)
IMPLS = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


class HostReads(TorchDispatchMode):
    """The host reads of tensor values, split into step-counter reads and the others."""

    def __init__(self, step_ptrs: set[int]) -> None:
        super().__init__()
        self.step_ptrs = step_ptrs
        self.steps = 0
        self.data: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            first = args[0] if args else None
            if torch.is_tensor(first) and first.data_ptr() in self.step_ptrs:
                self.steps += 1
            else:
                self.data.append(name)
        return func(*args, **(kwargs or {}))


def sig(active=0.7, overshoot=0.0):
    t = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
    return TrustRegionSignal(t(active), t(1), t(100), t(100), t(30), t(overshoot), t(0))


def warm(kw, groups=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (3000, 17, 4096, 5)]
    per = len(params) // groups
    opt = ClipAwareAdamW([{"params": params[i * per : (i + 1) * per]} for i in range(groups)], lr=1e-2, **kw)
    for _ in range(2):
        opt.observe(sig(overshoot=10))
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    opt.observe(sig())
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params, opt


def counted_step(opt):
    steps = {st["step"].data_ptr() for st in opt.state.values()}
    with HostReads(steps) as reads:
        opt.step()
    return reads


@pytest.mark.parametrize("impl", list(IMPLS))
def test_torch_paths_read_one_value_per_step(impl):
    _, opt = warm(IMPLS[impl])
    reads = counted_step(opt)
    assert reads.data == ["_local_scalar_dense"]  # the non-finite check's answer (one device, one dtype)


@contextlib.contextmanager
def counting_launches():
    """Count the Triton launches of the optimizer's kernels (the interpreter runs them)."""
    counts = {"update": 0, "check": 0}
    update, triton = adamw_mod._kernel()
    check = adamw_mod._check_kernel()

    class Counting:
        def __init__(self, fn, key):
            self.fn, self.key = fn, key

        def __getitem__(self, grid):
            counts[self.key] += 1
            return self.fn[grid]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adamw_mod, "_kernel", lambda: (Counting(update, "update"), triton))
        mp.setattr(adamw_mod, "_check_kernel", lambda: Counting(check, "check"))
        yield counts


@TRITON
@pytest.mark.parametrize("groups", [1, 2])
def test_triton_path_reads_nothing_and_launches_one_update_per_group(groups):
    _, opt = warm(dict(backend="triton"), groups=groups)
    with counting_launches() as launches:
        reads = counted_step(opt)
    assert reads.data == [] and reads.steps == 0
    assert launches == {"check": 1, "update": groups}


@TRITON
def test_triton_path_skips_a_nonfinite_gradient_on_the_device():
    params, opt = warm(dict(backend="triton"))
    ref_params, ref = warm(dict(backend="torch", foreach=True))
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items() if torch.is_tensor(v)}
    params[2].grad[7] = float("nan")
    reads = counted_step(opt)
    assert reads.data == []  # the skip was decided on the device
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in state.items())
    assert opt.skipped_steps == 1  # read now (one host read)
    assert opt.state_dict()["param_groups"][1]["ca_skipped"] == 1
    for p, q in zip(params, ref_params):  # the next step is the torch path's step
        q.grad = p.grad = torch.ones(p.shape)
    opt.step()
    ref.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert float(opt.state[params[0]]["step"]) == 3.0 and opt.state[params[0]]["step"].device == params[0].device
