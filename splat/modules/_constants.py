"""Constant tensors the fused modules need on every call (identity BN vectors, SK's channel order),
made once per shape, dtype and device rather than on every call: in eager mode each op that makes
one costs the host a launch.

Only values that depend on nothing but their key are kept. Values derived from parameters or
buffers (eval-mode BN folds, say) are not: an in-place change through ``.data``, which EMA and
weight-swapping code does, bumps no version counter, so no key could tell a kept fold was stale.
"""

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

T = TypeVar("T")

_KEPT: dict = {}


def constant(key: tuple[Hashable, ...], make: Callable[[], T]) -> T:
    """``make()``, kept under ``key`` (which must determine the value: shapes, dtypes, devices).

    Made afresh, and not kept, while torch.compile or torch.jit.trace traces (the graph makes it
    itself), a dispatch mode such as FakeTensorMode intercepts ops, or a CUDA graph is being captured
    (nothing runs then: a kept tensor would hold garbage until a replay). Inference mode is part of
    the key: a tensor made there cannot be saved for backward outside it.
    """
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._len_torch_dispatch_stack() > 0
        or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
    ):
        return make()
    key = (torch.is_inference_mode_enabled(), *key)
    if key not in _KEPT:
        _KEPT[key] = make()
    return _KEPT[key]
