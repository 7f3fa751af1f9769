"""``splat.convert``: swap the split-attention / selective-kernel / Res2Net blocks of a model for
their fused equivalents, in place.

Modules are recognised by class name *and* attributes, wherever the class was defined (users
keep their own copies of these files):

========================  =================================  ========================
class name                attributes                         replaced by
========================  =================================  ========================
``SplAtConv2d``           conv, fc1, fc2, radix              ``FusedSplAtConv2d``
``SplitAttn``             conv, fc1, fc2, radix (timm)       ``FusedSplAtConv2d``
``SplitAttentionConv2d``  conv, fc1, fc2, radix (OpenMMLab)  ``FusedSplAtConv2d``
``SKConv``                convs, fc, fcs                     ``FusedSKConv``
``SelectiveKernel``       paths, attn (timm)                 ``FusedSelectiveKernel``
``Bottle2neck``           conv1, conv3, convs, bns           ``FusedBottle2neck``
========================  =================================  ========================

(``Bottle2neck``: the original Res2Net's, timm's and OpenMMLab's.)

Anything else is left alone, and so is a recognised module whose configuration the fused
kernels do not cover (DropBlock, a non-ReLU activation, a GroupNorm, ...: its ``from_module``
raises ValueError; TypeError for another kind of module with the same name and attributes) or
that has, on itself or inside, forward or backward hooks (the fused module would silently not
run them), parametrized tensors (not carried over) or tied parameters or buffers (held by two of
its modules, or also by a module outside it: the fused module's copies would untie them). Such a
module is reported as skipped, with the reason. A block that sits in several places of the model
(one module, shared) becomes one fused module in all of them.

What was done is returned in ``model.splat_conversion`` (a :class:`ConversionReport`) and logged
at INFO level on the ``"splat"`` logger (``logging.basicConfig(level=logging.INFO)`` shows it).

Convert *before* wrapping the model in DistributedDataParallel, FSDP or ``torch.compile`` (a model
that is or holds such a wrapper is refused with TypeError) and before creating the optimizer: the
fused modules hold new parameter tensors (same values, same names).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from splat import backend as _backend

logger = logging.getLogger("splat")

__all__ = ["ConversionReport", "convert"]


@dataclass
class ConversionReport:
    """What :func:`convert` did. ``converted``: original class name -> count;
    ``skipped``: (qualified module name, class name, reason) of recognised but unsupported modules."""

    converted: Counter = field(default_factory=Counter)
    skipped: list = field(default_factory=list)

    def __str__(self) -> str:
        done = ", ".join(f"{n} x{c}" for n, c in sorted(self.converted.items())) or "nothing"
        text = f"splat.convert: replaced {done}"
        if self.skipped:
            text += f"; left {len(self.skipped)} unchanged: " + "; ".join(
                f"{name or '<model>'} ({cls}): {why}" for name, cls, why in self.skipped
            )
        return text


def _fused_splat():
    from splat.modules.splat_conv import FusedSplAtConv2d

    return FusedSplAtConv2d


def _fused_sk():
    from splat.modules.sk_conv import FusedSKConv

    return FusedSKConv


def _fused_res2net():
    from splat.modules.res2net import FusedBottle2neck

    return FusedBottle2neck


# class name -> (required attributes, lazy getter of the fused class)
_RULES = {
    "SplAtConv2d": (("conv", "fc1", "fc2", "radix"), _fused_splat),
    "SplitAttn": (("conv", "fc1", "fc2", "radix"), _fused_splat),
    "SplitAttentionConv2d": (("conv", "fc1", "fc2", "radix"), _fused_splat),
    "SKConv": (("convs", "fc", "fcs"), _fused_sk),
    "SelectiveKernel": (("paths", "attn"), _fused_sk),
    "Bottle2neck": (("conv1", "conv3", "convs", "bns"), _fused_res2net),
}


def _recognise(module: nn.Module):
    rule = _RULES.get(type(module).__name__)
    if rule is None or not all(hasattr(module, attr) for attr in rule[0]):
        return None
    return rule[1]


# Per-module hooks that run around a module's forward and backward.
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _check_no_hooks(block: nn.Module) -> None:
    """ValueError if ``block`` or a module inside it has hooks or parametrizations: the fused module
    is a new module that runs its inner ones through kernels, so hooks would silently stop running,
    and from_module copies plain weights."""
    for name, m in block.named_modules():
        where = f"{type(block).__name__}.{name}" if name else type(block).__name__
        if any(getattr(m, hooks, None) for hooks in _HOOKS):
            raise ValueError(f"{where} has forward or backward hooks, which the fused module would not run")
        if parametrize.is_parametrized(m):
            raise ValueError(f"{where} has parametrized tensors, which convert does not carry over")


@dataclass
class _Sharing:
    """What ``convert`` knows of the whole model's sharing while it replaces blocks one by one: the
    paths to each module and to each parameter and buffer (by id, counted before any replacement:
    a shared module's tensors count once per place it sits), and each module met so far, with its
    replacement or None."""

    modules: Counter
    tensors: Counter
    done: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module) -> "_Sharing":
        tensors = (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
        return cls(Counter(id(m) for _, m in model.named_modules(remove_duplicate=False)),
                   Counter(id(t) for _, t in tensors))

    def check_not_tied(self, block: nn.Module) -> None:
        """ValueError if a parameter or buffer of ``block`` is held by two of its modules, or by a
        module outside it: tied weights, which the fused module's copies would untie. Untied, each
        is reached by exactly one path per place the block sits."""
        places = self.modules[id(block)]
        for name, t in (*block.named_parameters(), *block.named_buffers()):
            if self.tensors[id(t)] != places:
                raise ValueError(
                    f"{type(block).__name__}.{name} is tied to another parameter or buffer, inside the block or "
                    "out, which the fused module's copies would untie"
                )


def _check_not_wrapped(model: nn.Module) -> None:
    """TypeError if ``model`` is, or holds, a DistributedDataParallel, FSDP or torch.compile wrapper:
    these keep the parameters (or the compiled code) of the blocks they were given, so fused blocks
    swapped in under them would silently go without gradient synchronisation, sharding or the
    compiled code."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    for name, m in model.named_modules():
        if isinstance(m, (nn.parallel.DistributedDataParallel, FullyShardedDataParallel, FSDPModule, OptimizedModule)):
            raise TypeError(
                f"{name or 'model'} is wrapped ({type(m).__name__}): call splat.convert on the model before "
                "wrapping it in DistributedDataParallel, FSDP or torch.compile"
            )


def _is_channels_last(module: nn.Module) -> bool:
    return any(
        p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
        for p in module.parameters()
    )


def _replace(module: nn.Module, qualname: str, backend: str, report: ConversionReport, sharing: _Sharing):
    """The fused replacement of ``module``, None if it is not recognised or not supported."""
    get_fused = _recognise(module)
    if get_fused is None:
        return None
    cls_name = type(module).__name__
    try:
        _check_no_hooks(module)
        sharing.check_not_tied(module)
        fused = get_fused().from_module(module, backend=backend)
    except (ValueError, TypeError) as err:  # TypeError: the name and attributes match, the module does not
        report.skipped.append((qualname, cls_name, str(err)))
        return None
    if _is_channels_last(module):
        fused = fused.to(memory_format=torch.channels_last)
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    for name, p in fused.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    report.converted[cls_name] += 1
    return fused


def _convert_children(
    parent: nn.Module, prefix: str, backend: str, report: ConversionReport, sharing: _Sharing
) -> None:
    # _modules, not named_children(), which yields a module held under two names only once.
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        if child in sharing.done:
            fused = sharing.done[child]
        else:
            qualname = f"{prefix}.{name}" if prefix else name
            fused = sharing.done[child] = _replace(child, qualname, backend, report, sharing)
            if fused is None and _recognise(child) is None:  # a skipped block is left whole, inner modules included
                _convert_children(child, qualname, backend, report, sharing)
        if fused is not None:
            setattr(parent, name, fused)


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace, in place, every recognised block of ``model`` by its fused equivalent (weights,
    buffers, device, dtype, memory format, train/eval mode and ``requires_grad`` preserved) and
    return the model; when ``model`` itself is a recognised block, its replacement is returned.

    ``backend`` ("auto", "triton", "cuda", "torch") is given to every fused module. The result
    is in ``<returned model>.splat_conversion`` (:class:`ConversionReport`) and logged on the
    ``"splat"`` logger. Recognition and skipping rules: see this module's docstring.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _backend.check_name(backend)
    _check_not_wrapped(model)
    report = ConversionReport()
    sharing = _Sharing.of(model)
    fused = _replace(model, "", backend, report, sharing)
    if fused is not None:
        model = fused
    elif _recognise(model) is None:
        _convert_children(model, "", backend, report, sharing)
    model.splat_conversion = report
    logger.info("%s", report)
    return model
