"""Memory layouts and output allocation shared by every backend and by the fake kernels.

Every op accepts any strided 4-D input but computes on one of two dense layouts, NCHW
(``torch.contiguous_format``) or NHWC (``torch.channels_last``). Outputs take the layout the
input was normalised to, so real and fake implementations agree on strides.
"""

import torch

# Tests set this so that every output a kernel should fully overwrite starts as NaN:
# an element the kernel forgets to write then fails the comparison instead of passing on luck.
POISON = False


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """The dense layout ``t`` is computed in: channels_last only when ``t`` is NHWC and not NCHW."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its compute layout (a no-op for NCHW- or NHWC-contiguous tensors)."""
    return t.contiguous(memory_format=memory_format(t))


def empty(shape, like: torch.Tensor, dtype=None, fmt=None) -> torch.Tensor:
    """An uninitialised output on ``like``'s device, 4-D outputs in ``fmt`` (default: ``like``'s)."""
    dtype = like.dtype if dtype is None else dtype
    if len(shape) == 4:
        fmt = memory_format(like) if fmt is None else fmt
        out = torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)
    else:
        out = torch.empty(shape, dtype=dtype, device=like.device)
    if POISON:
        out.fill_(float("nan"))
    return out


def hw_stride(t: torch.Tensor) -> int:
    """Stride of the flattened H*W index of a dense 4-D tensor (NCHW or NHWC)."""
    _, _, h, w = t.shape
    if w > 1:
        return t.stride(3)
    if h > 1:
        return t.stride(2)
    return 1


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 data, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` (None stays None). Skips the call when ``t`` already is, as it mostly is:
    the small-vector code around the kernels is bound by the host's time per call in eager mode."""
    return t if t is None or t.dtype == dtype else t.to(dtype)
