"""Values a module derives from its parameters and buffers, kept between calls while those are unchanged.

Eval-mode BN folds, SK's combined conv weight, channel orders and identity vectors are a few
small ops each, and in eager mode every op costs the host a launch: recomputed on every call, they
were about a third of a fused block's inference forward. They change only when their inputs do, so
``memo`` keeps the last value per (module, name) and returns it while the inputs are the same
tensors, at the same version (in-place updates such as an optimizer step or load_state_dict bump
it) and storage (``module.to`` swaps it), and the other inputs compare equal.
"""

import weakref
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor
from torch.nn import Parameter

T = TypeVar("T")

_MEMO: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _key(inputs: tuple) -> tuple:
    return tuple((id(t), t._version, t.data_ptr()) if isinstance(t, Tensor) else t for t in inputs)


def memo(owner: object, name: str, inputs: tuple, compute: Callable[[], T]) -> T:
    """``compute()``, or the value it gave ``owner`` under ``name`` for the same ``inputs``.

    Computed afresh, and not kept, while torch.compile traces (the compiled graph folds it itself)
    or a dispatch mode such as FakeTensorMode intercepts ops, for tensor subclasses and inference
    tensors (no storage or version to key on), and while autograd would record it (grad mode on
    and a tensor input requiring grad: the value must then carry its graph). Inference mode is
    part of the key: a value made there cannot be saved for backward outside it.
    """
    tensors = [t for t in inputs if isinstance(t, Tensor)]
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or any(type(t) not in (Tensor, Parameter) or t.is_inference() for t in tensors)
        or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    ):
        return compute()
    # The tensors themselves stay in the entry: their ids cannot be reused while it holds them.
    key = (torch.is_inference_mode_enabled(), _key(inputs))
    entries = _MEMO.setdefault(owner, {})
    entry = entries.get(name)
    if entry is not None and entry[0] == key:
        return entry[2]
    value = compute()
    entries[name] = (key, tensors, value)
    return value
