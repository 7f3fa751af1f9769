"""FusedSplAtConv2d: ResNeSt's split-attention conv with the tail after the conv fused."""

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from splat import _layout
from splat import backend as _backend
from splat.modules.batchnorm import (
    batch_norm_scale_shift,
    batch_updates,
    check_batchnorm,
    check_norm_names,
    identity_bn,
    is_folded,
    normalized_dtype,
    split_attention_bn,
    synchronises,
    update_running_stats,
)
from splat.ops import attention_sum, radix_pool, radix_softmax, split_attention


def split_attention_ops(
    y: Tensor, scale: Tensor, shift: Tensor, bns: list, attention, radix: int, backend: str, groups: int = 1
) -> Tensor:
    """The split-attention tail on the separate ops, for attention MLPs that ``splat::split_attention``
    does not take (other norms or activations); shared by the ResNeSt and SK blocks.

    y (B, R*C, H, W) conv output (radix-major, or (k, r, j)-ordered with ``groups`` K), (scale, shift)
    the folded ``bns`` of y (empty: none), ``attention`` maps the pooled (B, C) to the weights
    (B, R*C) in y's channel order. Returns (B, C, H, W) in y's layout.
    """
    gap = radix_pool(y, scale, shift, radix, backend, groups=groups)
    out = attention_sum(y, scale, shift, attention(gap), radix, backend, groups=groups)
    return _layout.cast(out, torch.promote_types(out.dtype, normalized_dtype(y, bns)))


def attention_dtype(y: Tensor, fc2_weight: Tensor, radix: int) -> torch.dtype:
    """The dtype of the reference's attention weights, which with y's sets the output's: under CUDA
    autocast its softmax runs in float32 (its sigmoid, for radix 1, does not); elsewhere the fc2
    output's."""
    device = y.device.type
    if torch.is_autocast_enabled(device):
        return torch.float32 if device == "cuda" and radix > 1 else torch.get_autocast_dtype(device)
    return torch.promote_types(y.dtype, fc2_weight.dtype)


def fused_tail(
    y: Tensor, bn0: tuple, bn0_modules: list, order: Tensor | None, fc1_weight: Tensor, fc1_bias: Tensor | None,
    bn1: tuple, bn1_module: nn.Module | None, relu: bool, fc2_weight: Tensor, fc2_bias: Tensor | None,
    radix: int, cardinality: int, groups: int, backend: str,
) -> Tensor:
    """``splat::split_attention`` on y, then the BNs' running statistics from its batch statistics."""
    out, mean0, var0, mean1, var1 = split_attention(
        y, bn0=bn0, fc1_weight=fc1_weight, fc1_bias=fc1_bias, bn1=bn1, relu=relu, fc2_weight=fc2_weight,
        fc2_bias=fc2_bias, radix=radix, cardinality=cardinality, groups=groups,
        out_dtype=torch.promote_types(normalized_dtype(y, bn0_modules), attention_dtype(y, fc2_weight, radix)),
        backend=backend,
    )
    updates = batch_updates(bn0_modules, mean0, var0, y.shape[0] * y.shape[2] * y.shape[3], order)
    if bn1_module is not None:
        updates += batch_updates([bn1_module], mean1, var1, y.shape[0])
    update_running_stats(updates)
    return out


def check_input(x: Tensor, weight: Tensor, in_channels: int) -> None:
    """Shared validation of a block's input x (B, in_channels, H, W) against its first weight."""
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"input must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] != in_channels:
        raise ValueError(f"input has {x.shape[1]} channels, expected in_channels={in_channels}")
    if x.device != weight.device:
        raise ValueError(f"input is on {x.device} but the module's parameters are on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"input dtype {x.dtype} does not match the module's parameter dtype {weight.dtype}")


def has_layer(m: nn.Module, attr: str) -> bool:
    """Whether ``m`` has a layer ``attr`` that does something: not missing, None or nn.Identity
    (timm keeps disabled layers as either)."""
    layer = getattr(m, attr, None)
    return layer is not None and not isinstance(layer, nn.Identity)


def _plain(layer: nn.Module, cls: type) -> bool:
    """Whether ``layer`` computes what ``cls`` computes with its weights: a ``cls``, or detectron2's
    Conv2d (a subclass of the same name) with its optional norm and activation unset."""
    if type(layer) is cls:
        return True
    return (
        isinstance(layer, cls) and type(layer).__name__ == cls.__name__
        and all(hasattr(layer, a) and getattr(layer, a) is None for a in ("norm", "activation"))
    )


def check_conv(conv: nn.Module, name: str, cls: type = nn.Conv2d, subclass: bool = False) -> None:
    """ValueError unless ``conv`` computes a plain ``cls`` (any subclass with ``subclass``) with
    explicit zero padding: the kernels and the fused modules read its weight, and a subclass may
    compute something else with it (weight standardisation, dynamic 'same' padding)."""
    if not isinstance(conv, cls) or not (subclass or _plain(conv, cls)):
        kind = f"{type(conv).__module__}.{type(conv).__qualname__}"
        raise ValueError(f"{name} is {kind}, which may compute something other than torch.nn.{cls.__name__}: not fused")
    if cls is nn.Conv2d and (conv.padding_mode != "zeros" or isinstance(conv.padding, str)):
        raise ValueError(f"{name}: padding must be explicit zeros, got {conv.padding!r}/{conv.padding_mode!r}")


class FusedSplAtConv2d(nn.Module):
    """Drop-in ``SplAtConv2d`` (same arguments, defaults and state_dict keys) with fused kernels.

    Input (B, in_channels, H, W), NCHW or channels_last; output (B, channels, H', W') in the
    input's memory format. ``backend``: "auto" (``$SPLAT_BACKEND`` if set, else the fastest for
    the device), "triton", "cuda" or "torch" (pure PyTorch, runs anywhere).
    """

    def __init__(
        self, in_channels, channels, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
        groups=1, bias=True, radix=2, reduction_factor=4, rectify=False, rectify_avg=False,
        norm_layer=None, dropblock_prob=0.0, *, backend="auto", device=None, dtype=None,
    ):
        super().__init__()
        if dropblock_prob > 0.0:
            raise ValueError(
                "dropblock_prob > 0 is not supported (the original module's DropBlock2D is a stub that raises)"
            )
        if not isinstance(radix, int) or radix < 1:
            raise ValueError(f"radix must be a positive int, got {radix!r}")
        if not isinstance(groups, int) or groups < 1 or channels % groups:
            raise ValueError(f"groups={groups!r} must be a positive int dividing channels={channels}")
        padding = _pair(padding)
        # Only when given: user norm_layer callables often take just the channel count.
        factory = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.backend = _backend.check_name(backend)
        self.rectify = rectify and (padding[0] > 0 or padding[1] > 0)
        self.rectify_avg = rectify_avg
        inter_channels = max(in_channels * radix // reduction_factor, 32)
        self.radix = radix
        self.cardinality = groups
        self.channels = channels
        self.dropblock_prob = dropblock_prob
        self.conv = nn.Conv2d(
            in_channels, channels * radix, kernel_size, stride, padding, dilation,
            groups=groups * radix, bias=bias, **factory,
        )
        self.use_bn = norm_layer is not None
        if self.use_bn:
            self.bn0 = check_batchnorm(norm_layer(channels * radix, **factory), "norm_layer")
        self.fc1 = nn.Conv2d(channels, inter_channels, 1, groups=groups, **factory)
        if self.use_bn:
            self.bn1 = norm_layer(inter_channels, **factory)
        self.fc2 = nn.Conv2d(inter_channels, channels * radix, 1, groups=groups, **factory)

    def extra_repr(self) -> str:
        return f"radix={self.radix}, cardinality={self.cardinality}, backend={self.backend!r}"

    def _rectify_ratio(self, x: Tensor, y: Tensor) -> Tensor:
        """(1, 1, H', W') per-pixel factor of the rectified conv: taps/valid_taps, or 1/valid_taps."""
        kh, kw = self.conv.kernel_size
        ones = x.new_ones((1, 1) + x.shape[2:], dtype=y.dtype)
        valid = F.conv2d(
            ones, ones.new_ones((1, 1, kh, kw)), None, self.conv.stride, self.conv.padding, self.conv.dilation
        )
        return (1.0 if self.rectify_avg else float(kh * kw)) / valid

    def _mlp(self, gap: Tensor) -> Tensor:
        z = self.fc1(gap[:, :, None, None])
        if self.use_bn:
            z = self.bn1(z)
        return self.fc2(torch.relu(z)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.conv.weight, self.conv.in_channels)
        y = self.conv(x)
        if self.rectify:
            y = y * self._rectify_ratio(x, y)
        if y.shape[0] == 0:
            return y[:, : self.channels]
        bn0s = []  # the BN the kernels fold, if any
        if self.use_bn:  # bn0 may have been swapped since construction (convert_sync_batchnorm, say)
            check_batchnorm(self.bn0, "bn0")
            if synchronises(self.bn0):
                y = self.bn0(y)
            else:
                bn0s = [self.bn0]
        bn1 = getattr(self, "bn1", None)
        if bn1 is None or is_folded(bn1):
            return fused_tail(
                y, split_attention_bn(bn0s, y), bn0s, None, self.fc1.weight.flatten(1), self.fc1.bias,
                split_attention_bn([bn1], y) if bn1 is not None else identity_bn(self.fc1.out_channels, y), bn1,
                True, self.fc2.weight.flatten(1), self.fc2.bias, self.radix, self.cardinality, 1, self.backend,
            )
        scale, shift = batch_norm_scale_shift(y, bn0s, self.backend)

        def attention(gap: Tensor) -> Tensor:
            return radix_softmax(self._mlp(gap), self.radix, self.cardinality, self.backend)

        return split_attention_ops(y, scale, shift, bn0s, attention, self.radix, self.backend)

    @classmethod
    def from_module(cls, m: nn.Module, backend: str = "auto") -> "FusedSplAtConv2d":
        """A FusedSplAtConv2d computing what ``m`` computes: the original ``SplAtConv2d``, timm's
        ``SplitAttn`` or OpenMMLab's ``SplitAttentionConv2d`` (mmdet, mmseg, mmpretrain). Weights
        and buffers are copied; device, dtypes and train/eval mode are kept."""
        conv, radix = m.conv, m.radix
        name = type(m).__name__
        check_norm_names(m, (0, 1), name)
        # A rectified conv (the original's RFConv2d) is a Conv2d subclass: its rectification is fused.
        check_conv(conv, f"{name}.conv", subclass=getattr(m, "rectify", False))
        check_conv(m.fc1, f"{name}.fc1")
        check_conv(m.fc2, f"{name}.fc2")
        bn0 = getattr(m, "bn0", None)
        use_bn = has_layer(m, "bn0")
        if getattr(m, "dropblock_prob", 0.0) > 0.0 or has_layer(m, "drop"):
            raise ValueError(f"{name} uses DropBlock, which FusedSplAtConv2d does not support")
        for act in ("act0", "act1", "relu"):
            if hasattr(m, act) and type(getattr(m, act)) is not nn.ReLU:
                raise ValueError(f"{name}.{act} is {type(getattr(m, act)).__name__}; only ReLU is fused")
        fused = cls(
            conv.in_channels, conv.out_channels // radix, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, groups=conv.groups // radix, bias=conv.bias is not None, radix=radix,
            rectify=getattr(m, "rectify", False), rectify_avg=getattr(m, "rectify_avg", False),
            norm_layer=nn.BatchNorm2d if use_bn else None, backend=backend,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        fused.conv.load_state_dict(conv.state_dict())
        fused.fc1, fused.fc2 = copy.deepcopy(m.fc1), copy.deepcopy(m.fc2)
        if use_bn:
            fused.bn0 = check_batchnorm(copy.deepcopy(bn0), f"{name}.bn0")
            fused.bn1 = copy.deepcopy(m.bn1)
        return fused.train(m.training)
