"""The per-token math under torch.compile (grpo_fix.loss.compiled) equals the eager math.

On CPU the compiled path runs Inductor's C++ backend (needs a C++ compiler; skipped without one),
the kernels the Triton interpreter.  On a GPU machine the kernel oracle tests of test_kernels.py
run the compiled math too ("auto" compiles for CUDA tensors).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from test_kernels import assert_outputs_close, cfg_for, linear_case, make_batch, oracle_logp

import grpo_fix.loss.compiled as cm
from grpo_fix import GroupSurrogateLoss, surrogate_loss
from grpo_fix.kernels import linear_surrogate_loss, logits_surrogate_loss

needs_cxx = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="Inductor's CPU backend needs a C++ compiler"
)
TIGHT = dict(rtol=1e-6, atol=1e-7)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: the compiled wrappers share one code object, so without a
    reset a long session could reach Dynamo's recompile limit and quietly run eagerly."""
    torch._dynamo.reset()
    cm._compiled.cache_clear()
    cm._FAILED.clear()
    yield
    torch._dynamo.reset()
    cm._compiled.cache_clear()


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _loss_and_grad(cfg, d, compile_math, use_ref):
    lp = oracle_logp(d["logits"], d["ids"]).detach().requires_grad_(True)
    out = surrogate_loss(
        cfg,
        lp,
        d["old"],
        d["adv"],
        d["mask"],
        group_size=d["G"],
        completion_ids=d["ids"],
        ref_logp=d["ref"] if use_ref else None,
        compile_math=compile_math,
    )
    out.loss.backward()
    return out, lp.grad


@needs_cxx
@pytest.mark.parametrize("name,beta", [("uniform", 0.05), ("gspo", 0.0), ("cispo", 0.0), ("grpo", 0.04)])
def test_compiled_math_equals_eager(name, beta):
    """Loss, gradient, every signal field and metric (W_agg from the prefix classes included)."""
    cfg = cfg_for(name, beta)
    d = make_batch(seed=3, spread=0.4 if name != "gspo" else 0.002)
    before = _graphs()
    out_c, grad_c = _loss_and_grad(cfg, d, "always", beta > 0)
    assert _graphs() > before, "nothing was compiled"
    out_e, grad_e = _loss_and_grad(cfg, d, "never", beta > 0)
    assert_outputs_close(out_c, out_e, TIGHT)
    torch.testing.assert_close(grad_c, grad_e, **TIGHT)
    # another batch shape reuses the dynamic graph family (no error, same results)
    d2 = make_batch(B=9, T=5, seed=4, spread=0.4 if name != "gspo" else 0.002)
    out_c, grad_c = _loss_and_grad(cfg, d2, True, beta > 0)
    out_e, grad_e = _loss_and_grad(cfg, d2, False, beta > 0)
    assert_outputs_close(out_c, out_e, TIGHT)
    torch.testing.assert_close(grad_c, grad_e, **TIGHT)


@needs_cxx
def test_kernel_entry_points_with_compiled_math():
    """Both kernel paths (Triton interpreter) with the compiled math equal the eager oracle."""
    cfg = cfg_for("uniform", 0.05)
    d = make_batch(seed=5)
    zr, z = (d["logits"].clone().requires_grad_(True) for _ in range(2))
    ref = surrogate_loss(
        cfg,
        oracle_logp(zr, d["ids"]),
        d["old"],
        d["adv"],
        d["mask"],
        group_size=d["G"],
        completion_ids=d["ids"],
        ref_logp=d["ref"],
    )
    ref.loss.backward()
    before = _graphs()
    out = logits_surrogate_loss(
        cfg, z * 1, d["ids"], d["old"], d["adv"], d["mask"], group_size=d["G"], ref_logp=d["ref"], compile_math="always"
    )
    out.loss.backward()
    assert _graphs() > before, "nothing was compiled"
    assert_outputs_close(out, ref)
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-5, atol=1e-6)

    lc = linear_case(seed=6)
    h, W = lc["hidden"].clone().requires_grad_(True), lc["weight"].clone().requires_grad_(True)
    hr, Wr = lc["hidden"].clone().requires_grad_(True), lc["weight"].clone().requires_grad_(True)
    ref = surrogate_loss(
        cfg,
        oracle_logp(hr @ Wr.t(), lc["ids"]),
        lc["old"],
        lc["adv"],
        lc["mask"],
        group_size=lc["G"],
        completion_ids=lc["ids"],
        ref_logp=lc["ref"],
    )
    ref.loss.backward()
    out = linear_surrogate_loss(
        cfg,
        h,
        W,
        lc["ids"],
        lc["old"],
        lc["adv"],
        lc["mask"],
        group_size=lc["G"],
        ref_logp=lc["ref"],
        chunk_tokens=9,
        compile_math="always",
    )
    out.loss.backward()
    assert _graphs() > before + 1, "the logits-free path compiled nothing"
    assert_outputs_close(out, ref)
    torch.testing.assert_close(h.grad, hr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(W.grad, Wr.grad, rtol=1e-5, atol=1e-6)


def test_compile_failure_warns_once_and_runs_eager(monkeypatch):
    def broken(fn, cfg):
        def run(*args):
            raise torch._dynamo.exc.TorchDynamoException("no backend here")

        return run

    monkeypatch.setattr(cm, "_compiled", broken)
    d = make_batch(seed=7)
    cfg = cfg_for("dapo", 0.0)
    with pytest.warns(RuntimeWarning, match="runs the eager math"):
        out, grad = _loss_and_grad(cfg, d, "always", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call goes straight to eager, silently
        out2, grad2 = _loss_and_grad(cfg, d, "always", False)
    ref, grad_ref = _loss_and_grad(cfg, d, "never", False)
    assert_outputs_close(out, ref, TIGHT)
    assert_outputs_close(out2, ref, TIGHT)
    torch.testing.assert_close(grad, grad_ref)


def test_compile_choice():
    cpu = torch.zeros(1)
    assert cm.use_compiled("auto", cpu) is False and cm.use_compiled("always", cpu) is True
    assert cm.use_compiled("never", cpu) is False
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="compile_math"):
            GroupSurrogateLoss("uniform", compile_math=bad)
    d = make_batch(seed=8)
    with pytest.raises(ValueError, match="compile_math"):
        logits_surrogate_loss(
            "dapo", d["logits"], d["ids"], d["old"], d["adv"], d["mask"], group_size=None, compile_math="sometimes"
        )
    # the 0.1 spellings still work for one release, with a DeprecationWarning naming the new one
    for old, new in ((True, "always"), (False, "never")):
        with pytest.warns(DeprecationWarning, match=f"compile_math='{new}'"):
            assert GroupSurrogateLoss("uniform", compile_math=old).compile_math == new


def test_no_cxx_compiler_falls_back_with_a_warning(tmp_path):
    """A real compiler failure (Inductor's CPU backend with no working C++ compiler, a fresh
    cache) takes the fallback: one RuntimeWarning, the eager result."""
    code = """
import warnings, torch
from grpo_fix import PRESETS, surrogate_loss
lp = (-torch.rand(4, 6, generator=torch.Generator().manual_seed(0))).requires_grad_()
args = (lp, lp.detach() - 0.1, torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.ones(4, 6, dtype=torch.bool))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = surrogate_loss(PRESETS["dapo"], *args, group_size=None, compile_math="always")
ref = surrogate_loss(PRESETS["dapo"], *args, group_size=None, compile_math="never")
ours = [str(w.message) for w in caught if "grpo_fix" in str(w.message)]
assert len(ours) == 1 and "runs the eager math" in ours[0], ours
assert torch.equal(out.loss, ref.loss)
print("fallback ok")
"""
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "fallback ok" in proc.stdout, proc.stderr[-3000:]


@needs_cxx
def test_each_configuration_compiles_on_its_own_budget():
    """Ten configurations in one process: every one compiles (a shared code object would hit
    Dynamo's recompile limit of 8 and run the last ones eagerly)."""
    d = make_batch(B=6, T=3, seed=9)
    for i in range(10):
        cfg = cfg_for("dapo", 0.0).replace(eps_high=0.2 + 0.01 * i)
        before = _graphs()
        out, grad = _loss_and_grad(cfg, d, "always", False)
        assert _graphs() > before, f"configuration {i} was not compiled"
        ref, grad_ref = _loss_and_grad(cfg, d, "never", False)
        assert_outputs_close(out, ref, TIGHT)
        torch.testing.assert_close(grad, grad_ref, **TIGHT)
    assert cm._compiled.cache_info().currsize == 10
