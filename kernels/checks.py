"""Input checks of the vocabulary paths, shared by the Triton kernels and their torch references.

Static checks raise ``ValueError`` (``TypeError`` for a non-tensor) naming the argument at fault.
The value checks that need the data (token ids outside ``[0, V)`` at valid positions, non-finite
log-probs there) are device flags (:func:`ids_out_of_range`) that a loss reads together with its
own checks in one host sync; the standalone log-prob functions read them at once
(:func:`raise_on_bad_logprobs`).  Ids at masked
positions may hold anything (``-100`` included): :func:`masked_ids` replaces them before use.
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: Logits / hidden-state dtypes of the Triton kernels (the torch references take any float dtype).
SUPPORTED_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int64, torch.int32)

IDS_OUT_OF_RANGE = "completion_ids has token ids outside [0, vocab size) at valid (mask=1) positions"


def check_tensor(name: str, value: Any, *, optional: bool = False) -> None:
    """``TypeError`` naming ``name`` unless ``value`` is a tensor (or None when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}; convert it with torch.as_tensor")


def check_temperature(temperature: Any) -> float:
    """The sampling temperature as a float; ``ValueError`` unless it is finite and > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return t


def check_ids(ids: Any, name: str = "completion_ids") -> None:
    """Token ids: an int64/int32 tensor of shape ``(B, T)`` or packed ``(N,)``."""
    check_tensor(name, ids)
    if ids.dtype not in ID_DTYPES:
        raise ValueError(f"{name} must be int64 or int32, got {ids.dtype}")
    if ids.dim() not in (1, 2):
        raise ValueError(f"{name} must be (B, T) or packed (N,), got shape {tuple(ids.shape)}")


def check_mask(mask: Any, ids: torch.Tensor, name: str = "mask") -> None:
    """A mask of ``ids``' shape and device, bool or 0/1 numeric (its values are checked by the loss)."""
    check_tensor(name, mask, optional=True)
    if mask is None:
        return
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"{name} shape {tuple(mask.shape)} != completion_ids shape {tuple(ids.shape)}")
    if mask.dtype.is_complex:
        raise ValueError(f"{name} must be bool or 0/1 numeric, got {mask.dtype}")
    if mask.device != ids.device:
        raise ValueError(f"{name} is on {mask.device} but completion_ids on {ids.device}")


def check_logits(logits: Any, ids: torch.Tensor, mask: torch.Tensor | None, name: str = "logits") -> int:
    """Logits of ``(B, T, V)`` or ``(B, T + 1, V)`` (the extra last position is ignored) for
    ``(B, T)`` ids, or ``(N, V)`` for packed ``(N,)`` ids, floating, ``V >= 1``, on the ids' device.
    Returns ``V``."""
    check_ids(ids)
    check_tensor(name, logits)
    check_mask(mask, ids)
    if not logits.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got {logits.dtype}")
    if logits.device != ids.device:
        raise ValueError(f"{name} is on {logits.device} but completion_ids on {ids.device}")
    if logits.dim() != ids.dim() + 1:
        raise ValueError(f"{name} must be (B, T, V) for (B, T) ids or (N, V) for (N,) ids, got {tuple(logits.shape)}")
    if ids.dim() == 2:
        B, T = ids.shape
        if logits.shape[0] != B or logits.shape[1] not in (T, T + 1):
            raise ValueError(
                f"{name} shape {tuple(logits.shape)} does not match completion_ids {tuple(ids.shape)}: expected "
                f"(B, T, V) or (B, T + 1, V) (the extra last position is ignored); slice full-sequence logits to "
                "the completion positions first"
            )
    elif logits.shape[0] != ids.shape[0]:
        raise ValueError(f"{name} shape {tuple(logits.shape)} does not match packed completion_ids {tuple(ids.shape)}")
    V = logits.shape[-1]
    if V < 1:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0)")
    return V


def check_linear(hidden: Any, weight: Any, bias: Any, ids: torch.Tensor, *, packed: bool = False) -> int:
    """``hidden`` ``(B, T, H)`` / ``(B * T, H)`` (or packed ``(N, H)``) for ``ids``, ``weight``
    ``(V, H)`` and ``bias`` ``(V,)`` of one dtype and device, ``V >= 1``.  Returns ``V``."""
    check_ids(ids)
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
    check_tensor("bias", bias, optional=True)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (N, H) or (B, T, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be the (V, H) lm_head weight, got shape {tuple(weight.shape)}")
    H, V = hidden.shape[-1], weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {H} (expected (V, {H}))")
    if V < 1:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    if not hidden.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise ValueError(f"hidden and weight must be floating tensors, got {hidden.dtype} and {weight.dtype}")
    if weight.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise ValueError(
            f"weight dtype {weight.dtype} != hidden dtype {hidden.dtype}; cast one of them (outside "
            "autocast the GEMMs run in one dtype)"
        )
    if weight.device != hidden.device or ids.device != hidden.device:
        raise ValueError(
            f"hidden ({hidden.device}), weight ({weight.device}) and completion_ids ({ids.device}) "
            "must be on one device"
        )
    if bias is not None and (tuple(bias.shape) != (V,) or bias.device != weight.device):
        raise ValueError(f"bias must be ({V},) on {weight.device}, got {tuple(bias.shape)} on {bias.device}")
    N = ids.numel()
    if packed or ids.dim() == 1:
        if hidden.dim() != 2 or hidden.shape[0] != N:
            raise ValueError(f"hidden must be packed ({N}, H) for {N} packed tokens, got {tuple(hidden.shape)}")
    elif hidden.dim() == 3:
        if tuple(hidden.shape[:2]) != tuple(ids.shape):
            raise ValueError(
                f"hidden shape {tuple(hidden.shape)} does not match completion_ids (B, T) = "
                f"{tuple(ids.shape)}; pass the hidden states of the completion positions only"
            )
    elif hidden.shape[0] != N:
        raise ValueError(
            f"hidden (N, H) needs N = B * T = {N} (completion_ids {tuple(ids.shape)}), got N = {hidden.shape[0]}"
        )
    return V


def masked_ids(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``ids`` with masked positions replaced by 0, so that ``-100`` (or any id) there is harmless."""
    if mask is None:
        return ids
    return torch.where(mask.to(torch.bool), ids, torch.zeros((), dtype=ids.dtype, device=ids.device))


def ids_out_of_range(ids: torch.Tensor, mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Device flag (0-dim bool, no host sync): some id at a valid position is outside ``[0, V)``."""
    bad = (ids < 0) | (ids >= vocab_size)
    if mask is not None:
        bad = bad & mask.to(torch.bool)
    return bad.any()


def raise_on_bad_logprobs(
    logp: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, vocab_size: int, source: str = "logits"
) -> None:
    """The value checks of a standalone log-prob function, read at once (one host sync): ids outside
    ``[0, V)`` at valid positions (:func:`ids_out_of_range`), and NaN/inf log-probs there (NaN/inf
    ``source`` values, or an all ``-inf`` row).  A loss reads the same flags with its own checks."""
    if not ids.numel():
        return
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    flags = torch.stack([ids_out_of_range(ids, mask, vocab_size), (~torch.isfinite(logp) & valid).any()])
    if not flags.any().item():
        return
    bad_ids, bad_values = flags.tolist()
    messages = [IDS_OUT_OF_RANGE] if bad_ids else []
    if bad_values:
        messages.append(
            f"{source} give NaN/inf log-probs at valid (mask=1) positions (NaN/inf {source}, or a row "
            "that is -inf everywhere)"
        )
    raise ValueError("; ".join(messages))
