"""The one vocabulary of switches shared by the loss, the optimizer and the adapters.

- ``backend``: where the vocabulary work or the optimizer update runs.  ``"auto"`` picks the
  Triton kernels for CUDA tensors (when triton imports) and torch otherwise; ``"torch"`` and
  ``"triton"`` force one.  The same word and values on :class:`grpo_fix.GroupSurrogateLoss`,
  :class:`grpo_fix.ClipAwareAdamW` and ``GRPOFixConfig.loss_backend``.
- ``compile_math``: whether the loss's per-token math runs under ``torch.compile``:
  ``"auto"`` (CUDA tensors only), ``"always"`` or ``"never"``.

Spellings of earlier releases are accepted for one release with a ``DeprecationWarning``
naming the new one: ``kernel=`` (optimizer) and ``loss_kernel=`` (TRL config, whose ``"linear"``
is now ``"triton"``), and ``compile_math=True`` / ``False``.
"""

from __future__ import annotations

import os
import warnings
from types import FrameType
from typing import Any, Literal, cast, get_args

Backend = Literal["auto", "torch", "triton"]
CompileMath = Literal["auto", "always", "never"]

BACKENDS: tuple[str, ...] = get_args(Backend)
COMPILE_CHOICES: tuple[str, ...] = get_args(CompileMath)

_OLD_COMPILE: dict[bool, CompileMath] = {True: "always", False: "never"}


def deprecated(old: str, new: str) -> None:
    """Warn that the spelling ``old`` is deprecated in favour of ``new`` (removed in the next
    release), attributed to the first caller outside grpo_fix and torch.  Silent while
    ``torch.compile`` traces (the eager calls of the same code warn)."""
    import torch

    if torch.compiler.is_compiling():
        return
    warnings.warn(
        f"grpo_fix: {old} is deprecated and will be removed in the next release; use {new}",
        DeprecationWarning,
        stacklevel=_caller_stacklevel(),
    )


def _caller_stacklevel() -> int:
    """``stacklevel`` of the first frame outside this package and ``torch`` (a loss called
    through ``nn.Module.__call__`` passes through both)."""
    import sys

    import torch

    roots = [os.path.dirname(os.path.abspath(torch.__file__)) + os.sep]
    for package in ("grpo_fix", "grpo_fix.kernels", "grpo_fix.integration"):  # separate folders in a checkout
        path = getattr(sys.modules.get(package), "__file__", None)
        if path:
            roots.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    skip = tuple(roots)
    frame: FrameType | None = sys._getframe(2)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def check_backend(backend: Any, name: str = "backend") -> Backend:
    """``backend`` if it is one of :data:`BACKENDS`, else ``ValueError`` naming the argument."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS}, got {backend!r}")
    return cast(Backend, backend)


def check_compile_math(compile_math: Any, name: str = "compile_math") -> CompileMath:
    """``compile_math`` as one of :data:`COMPILE_CHOICES` (``True``/``False`` map to
    ``"always"``/``"never"`` with a ``DeprecationWarning``); anything else raises ``ValueError``."""
    if isinstance(compile_math, bool):
        new = _OLD_COMPILE[compile_math]
        deprecated(f"{name}={compile_math}", f"{name}={new!r}")
        return new
    if not isinstance(compile_math, str) or compile_math not in COMPILE_CHOICES:
        raise ValueError(f"{name} must be one of {COMPILE_CHOICES}, got {compile_math!r}")
    return cast(CompileMath, compile_math)
