"""Host-side helpers shared by the Triton launchers: argument checks, tile
sizes, the selection parameters of the routing kernels, the CUDA device guard
and the mask arguments of the fusion kernels.

Launchers expect validated inputs (the public ops validate); these checks only
guard the raw ``torch.ops.mars_triton.*`` entry points against misuse.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ...checks import leading_shape
from ..common import compute_dtype

__all__ = [
    "FLOAT_DTYPES", "ROW_GPU_TILE", "INTERPRETER_ROW_TILE", "SORT_ABOVE", "tl_dtype", "check_float", "check_k",
    "selection_outputs", "key_mode", "row_blocks", "select_params", "device_guard", "unit_column_stride", "mask_args",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Elements per program tile (BLOCK_T * BLOCK_E) of the row kernels of the
#: routing ops on a GPU, and under the interpreter (see :func:`row_blocks`).
ROW_GPU_TILE = 4096
INTERPRETER_ROW_TILE = 1 << 15
#: Above this many selected experts a bitonic sort of the row replaces the
#: rounds of a row max (see :func:`select_params`).
SORT_ABOVE = 8


def tl_dtype(dtype: torch.dtype):
    """The Triton type the kernels compute in for inputs of ``dtype``."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_k(k: int, E: int) -> None:
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, E={E}], got {k}")


def selection_outputs(
    logits: torch.Tensor, k: int
) -> tuple[int, int, int, torch.dtype, torch.Tensor, torch.Tensor]:
    """The start of a launcher that selects k of the E columns of logits [T, E]
    (1 <= k <= E, checked): (T, E, k, the compute dtype, weights [T, k] in it,
    indices [T, k] int64), both outputs uninitialised."""
    T, E = logits.shape
    k = int(k)
    check_k(k, E)
    cdt = compute_dtype(logits.dtype)
    weights = torch.empty((T, k), dtype=cdt, device=logits.device)
    return T, E, k, cdt, weights, torch.empty((T, k), dtype=torch.int64, device=logits.device)


def key_mode(dtype: torch.dtype, block_e: int) -> int:
    """Selection-key scheme of :mod:`._select_kernels` for logits of this dtype."""
    if dtype == torch.float64:
        return 3
    if block_e <= 65536 and dtype == torch.float16:
        return 1
    if block_e <= 65536 and dtype == torch.bfloat16:
        return 2
    return 0


def row_blocks(T: int, E: int, device: torch.device, gpu_tile: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps) for a [T, E] problem with about ``gpu_tile``
    (default :data:`ROW_GPU_TILE`) elements per program on a GPU (4 warps up to
    one tile, 8 up to two, else 16); under the interpreter a larger tile
    (:data:`INTERPRETER_ROW_TILE`) keeps the number of (sequentially simulated)
    programs small. The module constants are read per call (tests shrink them)."""
    gpu_tile = ROW_GPU_TILE if gpu_tile is None else gpu_tile
    interpreter_tile = INTERPRETER_ROW_TILE
    block_e = triton.next_power_of_2(E)
    tile = gpu_tile if device.type == "cuda" else interpreter_tile
    block_t = max(1, min(tile // block_e, triton.next_power_of_2(max(T, 1))))
    elems = block_t * block_e
    num_warps = 4 if elems <= gpu_tile else (8 if elems <= 2 * gpu_tile else 16)
    return block_t, block_e, num_warps


def select_params(m: int, block_e: int, mode: int) -> tuple[bool, int]:
    """(USE_SORT, KP) for selecting the m best of block_e lanes: above
    :data:`SORT_ABOVE` selected experts a bitonic sort of the row replaces the m
    rounds of a row max (float32 keys only; float64 always takes rounds)."""
    use_sort = m > SORT_ABOVE and mode != 3
    kp = block_e if use_sort else triton.next_power_of_2(m)
    return use_sort, kp


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device; make it the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def unit_column_stride(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (a copy only when it has none)."""
    return t if t.dim() < 2 or t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def mask_args(tokens, missing, observed):
    """Kernel arguments of the fusion ops' masks, for ``tokens`` [T, ...]:
    (missing, observed as uint8, HAS_MISSING, P masks, leading shape of the
    per-instance tensors: (T,) or (P, T)); ``tokens`` as dummies without missing rows."""
    lead = leading_shape(observed, tokens.shape[0])
    if missing is None:
        return tokens, tokens, False, 1, lead
    masks = lead[0] if len(lead) == 2 else 1
    return missing.contiguous(), observed.contiguous().view(torch.uint8), True, masks, lead
