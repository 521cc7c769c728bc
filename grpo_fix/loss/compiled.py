"""The per-token GRPO math under ``torch.compile``: when, how, and what happens if it fails.

Why: the math of Eq. 1 (ratio, clip, KL, weighting, the trust-region signal and the metrics) is
130 to 200 small torch ops per call (forward + backward) on ``(B, T)`` tensors.  Eagerly on a GPU
each is a kernel launch of a few microseconds, so the math costs a fixed ~0.5-1 ms per call
(estimated from the op count, not measured) whatever the vocabulary: as much as the whole fused
vocabulary pass at V = 32k.  Compiled (Inductor), the same Python source becomes a handful of
fused kernels, so :mod:`grpo_fix.loss.surrogate` stays the single source of truth and the kernels
stay vocabulary-only (see ``grpo_fix.kernels``).

``compile_math`` (an argument of every loss entry point, :mod:`grpo_fix.options`):

- ``"auto"`` (default): compiled for CUDA tensors, eager otherwise (CPU, the Triton interpreter);
- ``"always"`` / ``"never"``.

torch's own ``TORCH_COMPILE_DISABLE=1`` turns it off everywhere (the escape hatch where an
integration has no field for it, e.g. verl's policy-loss config); ``GRPOFixConfig`` has
``loss_compile_math``.

Each (math function, configuration) gets one ``torch.compile(dynamic=True)`` wrapper on its own
copy of the function's code, so batch and sequence lengths change without recompiling and each
configuration has its own Dynamo cache.  Dynamo still specialises on grad mode, on which
optional inputs are ``None`` and on a size threshold of its reduction heuristics: about 2-6
graphs per configuration in a training run, within Dynamo's recompile limit of 8 per code
object (past it Dynamo itself falls back to eager, with its own warning).  If compiling raises (a Dynamo or
Inductor error: an unsupported torch build, no C++ compiler on a CPU host), the configuration
warns once and runs eagerly from then on: the eager math is the same code, so only speed changes.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ..options import CompileMath
from .config import SurrogateConfig

R = TypeVar("R")

#: (math function, configuration) pairs whose compilation failed: they run eagerly.
_FAILED: set[tuple[Callable[..., Any], SurrogateConfig]] = set()


def use_compiled(compile_math: CompileMath, t: torch.Tensor) -> bool:
    """Whether ``compile_math`` (already checked by :func:`grpo_fix.options.check_compile_math`)
    means compiled for the math on ``t``'s device."""
    if compile_math == "auto":
        return t.is_cuda
    return compile_math == "always"


@functools.cache
def _compiled(fn: Callable[..., R], cfg: SurrogateConfig) -> Callable[..., R]:
    """``torch.compile(dynamic=True)`` of a private copy of ``fn`` for ``cfg`` (call it with ``cfg``).

    Dynamo keeps its graphs, guards and recompile limit per code object; with one shared code
    object, a process that uses several configurations (tests, a sweep) would spend one budget of
    8 recompiles on all of them and quietly run the later ones eagerly.  The copy differs only in
    its name (``policy_math[3]``: the 4th configuration compiled in this process).  It is compiled
    as a plain function: ``torch.compile`` of a ``functools.partial`` goes through one shared
    wrapper frame, which would share the budget again.
    """
    code = fn.__code__.replace(co_name=f"{fn.__name__}[{_compiled.cache_info().currsize}]")
    private = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return torch.compile(private, dynamic=True)


def run_math(fn: Callable[..., R], cfg: SurrogateConfig, compiled: bool, *args: Any) -> R:
    """``fn(cfg, *args)``, through its cached compiled wrapper when ``compiled`` (see above).

    Inside an outer ``torch.compile`` trace the function is called directly (Dynamo inlines it).
    """
    if compiled and not torch.compiler.is_compiling() and (fn, cfg) not in _FAILED:
        try:
            return _compiled(fn, cfg)(cfg, *args)
        except torch._dynamo.exc.TorchDynamoException as e:
            _FAILED.add((fn, cfg))
            first_line = (str(e).splitlines() or [""])[0]
            warnings.warn(
                f"grpo_fix: torch.compile of {fn.__name__} failed ({type(e).__name__}: {first_line}); "
                "this loss configuration runs the eager math from now on (same results, more kernel "
                "launches). Pass compile_math='never' to skip compiling.",
                RuntimeWarning,
                stacklevel=3,
            )
    return fn(cfg, *args)
