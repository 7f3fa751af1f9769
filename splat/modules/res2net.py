"""FusedBottle2neck: Res2Net's bottleneck with the multi-scale 3x3 stage fused into one op."""

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splat import _layout
from splat import backend as _backend
from splat.modules.batchnorm import (
    batch_updates,
    check_batchnorm,
    check_norm_names,
    is_folded,
    normalized_dtype,
    split_attention_bn,
    synchronises,
    update_running_stats,
    uses_batch_stats,
)
from splat.modules.splat_conv import check_conv, check_input, has_layer
from splat.ops.bn_add_relu import bn_add_relu
from splat.ops.res2net_chain import output_size, res2net_chain

STYPES = ("normal", "stage")


def _positive_int(v, name: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


class FusedBottle2neck(nn.Module):
    """Drop-in Res2Net ``Bottle2neck`` (same arguments, defaults and state_dict keys).

    ``cardinality`` and ``dilation`` (keyword-only) give timm's Res2NeXt / dilated variants:
    ``width = floor(planes * baseWidth / 64) * cardinality`` and the 3x3 branch convs use
    ``groups=cardinality``, ``dilation=padding=dilation``. Input (B, inplanes, H, W), NCHW or
    channels_last; output (B, planes * 4, H', W'), H' = (H - 1) // stride + 1. ``backend``:
    "auto" (``$SPLAT_BACKEND`` if set, else the fastest for the device), "triton", "cuda" or
    "torch" (pure PyTorch, runs anywhere); it picks the implementation of the branch chain and
    of bn1 + ReLU and bn3 + shortcut + ReLU (``splat::bn_add_relu``), the 1x1 convs run through
    PyTorch (cuDNN).

    ``drop_block`` and ``drop_path`` (None here; ``from_module`` copies timm's DropBlock and
    stochastic depth) run where timm runs them: on the concatenated branches before ``conv3``, and
    on ``bn3``'s output before the residual add. They hold no state_dict entries.
    """

    expansion = 4

    def __init__(
        self, inplanes, planes, stride=1, downsample=None, baseWidth=26, scale=4, stype="normal", *,
        cardinality=1, dilation=1, backend="auto", device=None, dtype=None,
    ):
        super().__init__()
        _positive_int(inplanes, "inplanes")
        _positive_int(planes, "planes")
        _positive_int(stride, "stride")
        _positive_int(scale, "scale")
        _positive_int(cardinality, "cardinality")
        _positive_int(dilation, "dilation")
        if stype not in STYPES:
            raise ValueError(f"stype must be one of {STYPES}, got {stype!r}")
        width = int(math.floor(planes * (baseWidth / 64.0))) * cardinality
        if width < 1:
            raise ValueError(f"planes={planes} and baseWidth={baseWidth!r} give a branch width of {width}")
        if stype == "normal" and stride > 1 and scale > 1:
            raise ValueError("stride > 1 needs stype='stage': a 'normal' block adds splits of different sizes")
        factory = {"device": device, "dtype": dtype}
        self.backend = _backend.check_name(backend)
        self.width, self.scale, self.stype, self.stride = width, scale, stype, stride
        self.cardinality, self.dilation = cardinality, dilation
        self.nums = 1 if scale == 1 else scale - 1
        self.conv1 = nn.Conv2d(inplanes, width * scale, kernel_size=1, bias=False, **factory)
        self.bn1 = nn.BatchNorm2d(width * scale, **factory)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, groups=cardinality,
                      bias=False, **factory)
            for _ in range(self.nums)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(width, **factory) for _ in range(self.nums))
        self.conv3 = nn.Conv2d(width * scale, planes * self.expansion, kernel_size=1, bias=False, **factory)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, **factory)
        self.downsample = downsample
        self.drop_block = self.drop_path = None

    def extra_repr(self) -> str:
        return (f"width={self.width}, scale={self.scale}, stype={self.stype!r}, cardinality={self.cardinality}, "
                f"dilation={self.dilation}, backend={self.backend!r}")

    def _branch_bn(self, acc: torch.dtype):
        """The branch BNs as concatenated (nums*width,) vectors, and whether they use batch statistics."""
        for i, bn in enumerate(self.bns):
            check_batchnorm(bn, f"bns.{i}")
        batch_stats = {uses_batch_stats(bn) for bn in self.bns}
        eps = {bn.eps for bn in self.bns}
        if len(batch_stats) > 1 or len(eps) > 1:
            raise ValueError("the branch BatchNorms must share eps and the statistics they use (batch or running)")
        device, width = self.conv1.weight.device, self.width

        def cat(name: str, fill: float) -> Tensor:
            """The BNs' ``name`` vectors concatenated in ``acc`` (``fill`` for a BN without one)."""
            return torch.cat([
                torch.full((width,), fill, dtype=acc, device=device) if t is None else _layout.cast(t, acc)
                for t in (getattr(bn, name) for bn in self.bns)
            ])

        gamma, beta, mean, var = cat("weight", 1.0), cat("bias", 0.0), cat("running_mean", 0.0), cat("running_var", 1.0)
        return gamma, beta, mean, var, eps.pop(), batch_stats.pop()

    def _unfused_chain(self, out: Tensor) -> Tensor:
        """The chain through the submodules: for empty batches (BN still counts them as batches), and
        for SyncBatchNorms that ``synchronises`` (each step's statistics span the processes)."""
        spx = torch.split(out, self.width, 1)
        pieces = []
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = spx[i] if i == 0 or self.stype == "stage" else sp + spx[i]
            sp = F.relu(bn(conv(sp)))
            pieces.append(sp)
        if self.scale > 1:
            pieces.append(F.avg_pool2d(spx[-1], 3, self.stride, 1) if self.stype == "stage" else spx[-1])
        return torch.cat(pieces, 1)

    def _bn_add_relu(self, bn: nn.Module, y: Tensor, residual: Tensor | None = None, drop_path=None) -> Tensor:
        """relu(drop_path(bn(y)) + residual): one op where the kernels fold ``bn``, there is no
        drop_path and the result keeps y's dtype (under autocast a FrozenBatchNorm2d of float32
        buffers promotes, and a float32 residual does not: the original adds it in place)."""
        if (drop_path is None and is_folded(bn) and y.shape[0] > 0 and normalized_dtype(y, [bn]) == y.dtype
                and (residual is None or residual.dtype == y.dtype)):
            out, mean, var = bn_add_relu(y, residual, bn=split_attention_bn([bn], y), backend=self.backend)
            n = y.shape[0] * y.shape[2] * y.shape[3]
            update_running_stats(batch_updates([bn], mean.detach(), var.detach(), n))
            return out
        out = bn(y)
        if drop_path is not None:
            out = drop_path(out)
        if residual is not None:
            out += residual
        return F.relu(out)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.conv1.weight, self.conv1.in_channels)
        out = self._bn_add_relu(self.bn1, self.conv1(x))
        if x.shape[0] == 0 or any(synchronises(bn) for bn in self.bns):
            chain = self._unfused_chain(out)
        else:
            gamma, beta, running_mean, running_var, eps, batch_stats = self._branch_bn(_layout.acc_dtype(out.dtype))
            # The cast: under autocast the branch convs run in conv1's output dtype, as nn.Conv2d would.
            weight = _layout.cast(torch.cat([conv.weight for conv in self.convs]), out.dtype)
            chain, mean, var = res2net_chain(
                out, weight, gamma, beta, running_mean, running_var, eps,
                self.scale, self.stype == "stage", self.stride, self.dilation, self.cardinality, batch_stats,
                save_y=torch.is_grad_enabled(), backend=self.backend,
            )
            if self.training and batch_stats:
                n = x.shape[0] * output_size(x.shape[2], self.stride) * output_size(x.shape[3], self.stride)
                update_running_stats(batch_updates(self.bns, mean.detach(), var.detach(), n))
        if self.drop_block is not None:
            chain = self.drop_block(chain)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self._bn_add_relu(self.bn3, self.conv3(chain), shortcut, self.drop_path)

    @classmethod
    def from_module(cls, m: nn.Module, backend: str = "auto") -> "FusedBottle2neck":
        """A FusedBottle2neck computing what ``m`` computes: the original Res2Net ``Bottle2neck``
        (``stype``), timm's (``is_first``, cardinality, dilation) or OpenMMLab's (``stage_type``,
        ``scales``, dilation). Weights, buffers, the downsample module and timm's drop_block /
        drop_path are copied; device, dtype and train/eval mode are kept."""
        name = type(m).__name__
        if hasattr(m, "stype"):
            stype = m.stype
        elif hasattr(m, "is_first"):
            stype = "stage" if m.is_first else "normal"
        elif hasattr(m, "stage_type"):
            stype = m.stage_type
            if stype == "stage" and getattr(m, "pool", None) is None:
                raise ValueError(f"{name}: a 'stage' block that does not pool its last split (OpenMMLab's at "
                                 "stride 1) is not fused")
            if getattr(m, "with_plugins", False):
                raise ValueError(f"{name} has plugins, which FusedBottle2neck does not run")
        else:
            raise TypeError(f"{name} is not a Res2Net Bottle2neck (no stype / is_first / stage_type)")
        check_norm_names(m, (1, 3), name)
        if m.conv1.stride != (1, 1):
            raise ValueError(f"{name}.conv1 has stride {m.conv1.stride}; the fused block strides in its 3x3 convs")
        for attr in ("se", "attn"):
            if has_layer(m, attr):
                raise ValueError(f"{name}.{attr} is set; FusedBottle2neck has no attention layer")
        relu = getattr(m, "relu", nn.ReLU())
        if type(relu) is not nn.ReLU:
            raise ValueError(f"{name}.relu is {type(relu).__name__}; only ReLU is fused")
        for i, (conv, bn) in enumerate(zip(m.convs, m.bns)):
            check_conv(conv, f"{name}.convs.{i}")
            if conv.kernel_size != (3, 3) or conv.padding != conv.dilation or len(set(conv.stride)) > 1:
                raise ValueError(f"{name}.convs.{i}: only square-strided 3x3 convs padded by their dilation are "
                                 f"fused, got kernel {conv.kernel_size}, padding {conv.padding}, stride {conv.stride}")
            check_batchnorm(bn, f"{name}.bns.{i}")
        conv = m.convs[0]
        weight = m.conv1.weight
        planes = m.conv3.out_channels // cls.expansion
        scale = m.scale if hasattr(m, "scale") else m.scales  # OpenMMLab's: scales
        fused = cls(
            m.conv1.in_channels, planes, conv.stride[0], None, baseWidth=64.0 * (m.width // conv.groups) / planes,
            scale=scale, stype=stype, cardinality=conv.groups, dilation=conv.dilation[0],
            backend=backend, device=weight.device, dtype=weight.dtype,
        )
        # floor(planes * baseWidth / 64) may round the reconstructed baseWidth down by one: m's width rules.
        fused.width = m.width
        fused.conv1, fused.bn1 = copy.deepcopy(m.conv1), copy.deepcopy(m.bn1)
        fused.convs, fused.bns = copy.deepcopy(m.convs), copy.deepcopy(m.bns)
        fused.conv3, fused.bn3 = copy.deepcopy(m.conv3), copy.deepcopy(m.bn3)
        fused.downsample = copy.deepcopy(m.downsample)
        for attr in ("drop_block", "drop_path"):
            if has_layer(m, attr):
                setattr(fused, attr, copy.deepcopy(getattr(m, attr)))
        return fused.train(m.training)
