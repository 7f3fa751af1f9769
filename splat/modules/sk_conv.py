"""FusedSKConv / FusedSelectiveKernel: SKNet's selective-kernel conv on the split-attention kernels.

Both compute, for M branches (paths) i of C channels each,

    branch_i = relu(bn_i(conv_i(x_i)))          x_i = x, or with split_input the i-th of M input slices
    gap      = mean_hw(sum_i branch_i)
    a        = softmax over i of mlp(gap)       (B, M, C)
    out      = sum_i a[:, i] * branch_i

and run the tail (BN folded into a per-channel affine map, ReLU, sum over branches, pool,
softmax over branches, weighted sum) on ``splat::radix_pool``/``radix_softmax``/``attention_sum``
with radix = M; BN + ReLU are recomputed by the kernels, never stored.

**One conv, one buffer (no stack, no cat).** The M branch convolutions are computed by a single
``F.conv2d`` whose output is the (B, M*C, H, W) buffer the tail reads. Its weight is built on the
fly (never stored, so the state_dict is the original's) by placing every branch's kernel,
dilation included, on the common footprint of the largest branch: 3x3 and 5x5 become two 5x5
kernels (the 3x3 zero-padded); timm's 3x3 dilation-2 path becomes a 5x5 kernel with taps on every
other position. Every branch is centred (padding = dilation*(k-1)/2), so the zero taps add exact
zeros and the result equals the per-branch convolutions.

- timm's ``split_input`` (skresnet18, skresnet34): branch i reads its own input slice, so
  the combined conv has M*G groups and writes the channels branch-major, exactly the split-attention
  layout (branch i at [i*C, (i+1)*C)).
- branches reading the whole input (the original SKConv; timm's ``split_input=False``, as in
  skresnext50_32x4d) with G groups: a conv with G groups writes group-major, (group k,
  branch i, channel j) at k*M*C/G + i*C/G + j.
  Instead of permuting that buffer, the ops take it as is (their ``groups`` argument), the folded BN
  vectors are gathered into that order (``batch_norm_scale_shift(order=...)``) and so are the logits.

Why not M convolutions plus a concatenation: the cat (or stack) writes and re-reads the whole
M*C-channel activation once more in the forward and splits its gradient again in the backward,
plus M conv launches instead of one. The zero taps cost FLOPs instead: for SKConv M=2 34 -> 50
taps (1.5x), M=3 83 -> 147 (1.8x); for timm's dilated 3x3 pair 18 -> 50 (2.8x). These are grouped
convolutions with few channels per group (skresnext50_32x4d: 4 input channels a group), whose kernels
are bound by memory and launch latency rather than arithmetic, and cuDNN's dense kernels are
usually faster than its dilated ones, so paying in FLOPs for one launch and one buffer is the
better trade there; for wide dense groups (G=1 and many channels) the extra FLOPs could dominate,
which the benchmark (bench_blocks.py, block "sk") is there to show.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splat import _layout
from splat import backend as _backend
from splat.modules._constants import constant
from splat.modules.batchnorm import (
    FrozenBatchNorm2d,
    batch_norm_scale_shift,
    check_batchnorm,
    identity_bn,
    is_folded,
    is_fusable_batchnorm,
    num_channels,
    split_attention_bn,
    synchronises,
)
from splat.modules.splat_conv import check_conv, check_input, fused_tail, has_layer, split_attention_ops
from splat.ops import radix_softmax


@dataclass(frozen=True)
class _Geometry:
    """Static shape of the combined conv (Python ints only, so torch.compile specialises on it)."""

    branches: int  # M
    channels: int  # C, per branch
    in_channels: int  # of the whole block
    groups: int  # of each branch conv
    split_input: bool
    stride: tuple
    extent: tuple  # (Eh, Ew): common footprint
    taps: tuple  # per branch: (offset_h, offset_w, dilation_h, dilation_w, kh, kw)

    @property
    def conv_groups(self) -> int:
        return self.groups * self.branches if self.split_input else self.groups

    @property
    def y_groups(self) -> int:
        """Channel order of the buffer: (k, i, j) with k < y_groups; 1 is branch-major."""
        return 1 if self.split_input or self.branches == 1 else self.groups


def _geometry(convs, in_channels: int, split_input: bool, owner: str) -> _Geometry:
    """Check that the branch convs can run as one conv, and how; ValueError naming what fails."""
    first = convs[0]
    M, C = len(convs), first.out_channels
    taps, extent = [], [1, 1]
    for i, conv in enumerate(convs):
        name = f"{owner} branch {i}"
        check_conv(conv, name)
        for attr in ("out_channels", "groups", "stride", "in_channels"):
            if getattr(conv, attr) != getattr(first, attr):
                raise ValueError(f"{name}: {attr}={getattr(conv, attr)} differs from branch 0's {getattr(first, attr)}")
        for d in range(2):
            k, dil, pad = conv.kernel_size[d], conv.dilation[d], conv.padding[d]
            if 2 * pad != dil * (k - 1):
                raise ValueError(
                    f"{name}: kernel {conv.kernel_size}, dilation {conv.dilation} and padding {conv.padding} "
                    "are not centred (2*padding == dilation*(kernel-1)); the branches could not share one output grid"
                )
            extent[d] = max(extent[d], dil * (k - 1) + 1)
    for conv in convs:
        (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
        taps.append(((extent[0] - dh * (kh - 1) - 1) // 2, (extent[1] - dw * (kw - 1) - 1) // 2, dh, dw, kh, kw))
    expected_in = first.in_channels * (M if split_input else 1)
    if expected_in != in_channels:
        raise ValueError(f"{owner}: branch convs read {first.in_channels} channels, block has {in_channels}")
    return _Geometry(M, C, in_channels, first.groups, split_input, tuple(first.stride), tuple(extent), tuple(taps))


def _branch_order(M: int, C: int, groups: int, device) -> Tensor:
    """order[q] = branch-major channel (i*C + k*C/G + j) held by buffer channel q = (k, i, j)."""
    return constant(
        ("sk order", M, C, groups, device),
        lambda: torch.arange(M * C, device=device).view(M, groups, C // groups).transpose(0, 1).reshape(-1),
    )


class _SelectiveKernelBase(nn.Module):
    """The shared forward. Subclasses give the branch convs and BNs, and the MLP gap -> logits."""

    def _convs(self) -> list:
        raise NotImplementedError

    def _bns(self) -> list:
        raise NotImplementedError

    def _logits(self, gap: Tensor) -> Tensor:
        """(B, C) pooled -> (B, M*C) logits, branch-major (branch i at [i*C, (i+1)*C))."""
        raise NotImplementedError

    def _mlp(self):
        """The MLP of ``_logits`` as (fc1_weight, fc1_bias, bn1 module or None, relu, fc2_weight,
        fc2_bias) for ``splat::split_attention``, or None when it has parts that op does not take."""
        raise NotImplementedError

    def _geometry(self) -> _Geometry:
        return _geometry(self._convs(), self.in_channels, self.split_input, type(self).__name__)

    def _combined_conv(self, g: _Geometry):
        """Weight (M*C, in/groups, Eh, Ew) and bias of the one conv, in the buffer's channel order."""
        convs = self._convs()
        w0 = convs[0].weight
        M, C = g.branches, g.channels
        if all(t == (0, 0, 1, 1) + tuple(g.extent) for t in g.taps):
            weight = torch.cat([conv.weight for conv in convs]) if M > 1 else w0
        else:
            weight = w0.new_zeros((M, C, w0.shape[1]) + g.extent)
            for i, (conv, (oh, ow, dh, dw, kh, kw)) in enumerate(zip(convs, g.taps)):
                weight[i, :, :, oh : oh + dh * (kh - 1) + 1 : dh, ow : ow + dw * (kw - 1) + 1 : dw] = conv.weight
            weight = weight.reshape((M * C, w0.shape[1]) + g.extent)
        has_bias = [conv.bias is not None for conv in convs]
        if any(has_bias) and not all(has_bias):
            raise ValueError(f"{type(self).__name__}: some branch convs have a bias and some do not")
        bias = None
        if all(has_bias):
            bias = torch.cat([conv.bias for conv in convs]) if M > 1 else convs[0].bias
        if g.y_groups > 1:
            # Gathered, not reordered by a transposed view: torch 2.11's inductor cannot lower a
            # convolution whose bias is a view.
            order = _branch_order(M, C, g.y_groups, weight.device)
            weight, bias = weight[order], None if bias is None else bias[order]
        return weight, bias

    def _branch_conv(self, x: Tensor) -> tuple[Tensor, _Geometry]:
        """All M branch convolutions as one: y (B, M*C, H', W') in the buffer's channel order."""
        g = self._geometry()
        weight, bias = self._combined_conv(g)
        padding = ((g.extent[0] - 1) // 2, (g.extent[1] - 1) // 2)
        return F.conv2d(x, weight, bias, g.stride, padding, 1, g.conv_groups), g

    def forward(self, x: Tensor) -> Tensor:
        convs = self._convs()
        check_input(x, convs[0].weight, self.in_channels)
        y, g = self._branch_conv(x)
        B, _, H, W = y.shape
        if B == 0:
            return torch.empty(
                (0, g.channels, H, W), dtype=y.dtype, device=y.device, memory_format=_layout.memory_format(y)
            )
        M, K = g.branches, g.y_groups
        order = None
        if K > 1:
            order = _branch_order(M, g.channels, K, y.device)
        bns, mlp = self._bns(), self._mlp() if M > 1 else None
        if any(synchronises(bn) for bn in bns):
            y, bns = _run_norms(y, bns, order), []
        bn0 = split_attention_bn(bns, y, order) if mlp is not None else None
        if bn0 is not None:
            fc1_weight, fc1_bias, bn1, relu, fc2_weight, fc2_bias = mlp
            return fused_tail(
                y, bn0, bns, order, fc1_weight, fc1_bias,
                split_attention_bn([bn1], y) if bn1 is not None else identity_bn(fc1_weight.shape[0], y), bn1,
                relu, fc2_weight, fc2_bias, M, 1, K, self.backend,
            )
        scale, shift = batch_norm_scale_shift(y, bns, self.backend, order)

        def attention(gap: Tensor) -> Tensor:
            logits = self._logits(gap)
            if order is not None:
                logits = logits[:, order]
            if M == 1:  # softmax over one branch: ones (radix_softmax's R=1 is ResNeSt's sigmoid gate)
                return logits.unsqueeze(1).softmax(1).squeeze(1)
            return radix_softmax(logits.reshape(B * K, -1), M, 1, self.backend).reshape(B, M * g.channels)

        return split_attention_ops(y, scale, shift, bns, attention, M, self.backend, groups=K)


def _run_norms(y: Tensor, bns: list, order: Tensor | None) -> Tensor:
    """y (B, M*C, H, W) in the buffer's channel order through the branch norms as modules (each
    over its C channels of the branch-major order), for SyncBatchNorms that ``synchronises``."""
    if order is not None:
        y = y[:, torch.argsort(order)]
    y = torch.cat([bn(part) for bn, part in zip(bns, y.split([num_channels(bn) for bn in bns], 1))], 1)
    return y[:, order] if order is not None else y


def _checked_relu(act: nn.Module, name: str) -> None:
    if type(act) is not nn.ReLU:
        raise ValueError(f"{name} is {type(act).__name__}; only ReLU is fused")


def _plain_batchnorm(bn: nn.Module, name: str) -> nn.Module:
    """A copy of ``bn`` the fused blocks take. timm's BatchNormAct2d, SyncBatchNormAct and
    FrozenBatchNormAct2d (the norm, then .drop, then .act) must act as ReLU and become a
    BatchNorm2d, SyncBatchNorm or :class:`FrozenBatchNorm2d` with the same state_dict keys."""
    if is_fusable_batchnorm(bn):
        return copy.deepcopy(bn)
    frozen = type(bn).__name__ == "FrozenBatchNormAct2d"
    if not hasattr(bn, "act") or not (frozen or isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm))):
        check_batchnorm(bn, name)  # raises: no norm the blocks take
    _checked_relu(bn.act, f"{name}.act")
    if has_layer(bn, "drop"):
        raise ValueError(f"{name}.drop is {type(bn.drop).__name__}; only Identity is fused")
    w = bn.running_mean if bn.running_mean is not None else bn.weight
    factory = {"device": w.device, "dtype": w.dtype} if w is not None else {}
    if frozen:
        plain = FrozenBatchNorm2d(bn.running_mean.numel(), bn.eps, **factory)
    else:
        args = (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if isinstance(bn, nn.SyncBatchNorm):
            plain = nn.SyncBatchNorm(*args, process_group=bn.process_group, **factory)
        else:
            plain = nn.BatchNorm2d(*args, **factory)
    plain.load_state_dict(bn.state_dict())
    return plain.train(bn.training)


class FusedSKConv(_SelectiveKernelBase):
    """Drop-in ``SKConv(features, WH, M, G, r, stride=1, L=32)`` (the widely copied SKNet module:
    same arguments and state_dict keys) running on splat's fused kernels.

    Branch i: Conv2d(features, features, 3+2i, stride, padding 1+i, groups G, bias) -> BN -> ReLU;
    ``fc`` Linear(features, d), ``fcs[i]`` Linear(d, features), d = max(int(features / r), L);
    ``WH`` is unused, as in the original. Input (B, features, H, W), NCHW or channels_last;
    output (B, features, H', W') in the input's memory format. ``backend``: "auto", "triton",
    "cuda" or "torch" (pure PyTorch). See the module docstring for how the
    M branch convolutions become one.
    """

    split_input = False

    def __init__(self, features, WH, M, G, r, stride=1, L=32, *, backend="auto", device=None, dtype=None):
        super().__init__()
        for value, name in ((features, "features"), (M, "M"), (G, "G"), (stride, "stride")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if features % G:
            raise ValueError(f"G={G} must divide features={features}")
        factory = {"device": device, "dtype": dtype}
        d = max(int(features / r), L)
        self.backend = _backend.check_name(backend)
        self.M, self.features, self.in_channels = M, features, features
        self.convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(features, features, 3 + 2 * i, stride, 1 + i, groups=G, **factory),
                nn.BatchNorm2d(features, **factory),
                nn.ReLU(inplace=False),
            )
            for i in range(M)
        )
        self.fc = nn.Linear(features, d, **factory)
        self.fcs = nn.ModuleList(nn.Linear(d, features, **factory) for _ in range(M))

    def extra_repr(self) -> str:
        return f"M={self.M}, features={self.features}, backend={self.backend!r}"

    def _convs(self):
        return [branch[0] for branch in self.convs]

    def _bns(self):
        return [check_batchnorm(branch[1], f"convs.{i}.1") for i, branch in enumerate(self.convs)]

    def _stacked_fcs(self) -> tuple[Tensor, Tensor | None]:
        """The fcs as one (M*features, d) linear map, branch-major."""
        weight = torch.cat([fc.weight for fc in self.fcs])
        bias = torch.cat([fc.bias for fc in self.fcs]) if self.fcs[0].bias is not None else None
        return weight, bias

    def _logits(self, gap: Tensor) -> Tensor:
        z = self.fc(gap)
        if self.M == 1:
            return self.fcs[0](z)
        return F.linear(z, *self._stacked_fcs())

    def _mlp(self):
        return (self.fc.weight, self.fc.bias, None, False, *self._stacked_fcs())

    @classmethod
    def from_module(cls, m: nn.Module, backend: str = "auto") -> nn.Module:
        """The fused equivalent of ``m``: an ``SKConv`` (convs/fc/fcs) gives a FusedSKConv, timm's
        ``SelectiveKernel`` (paths/attn) a :class:`FusedSelectiveKernel` (timm's state_dict keys).
        Weights and buffers are copied; device, dtype and train/eval mode are kept. ValueError for
        configurations the kernels do not fuse (non-ReLU activations, other norms, uncentred kernels)."""
        if hasattr(m, "paths") and hasattr(m, "attn"):
            return FusedSelectiveKernel.from_module(m, backend)
        name = type(m).__name__
        for attr in ("convs", "fc", "fcs"):
            if not hasattr(m, attr):
                raise TypeError(f"{name} is neither an SKConv (convs, fc, fcs) nor a SelectiveKernel (paths, attn)")
        branches = list(m.convs)
        for i, branch in enumerate(branches):
            parts = list(branch) if isinstance(branch, nn.Sequential) else []
            if len(parts) != 3 or not isinstance(parts[0], nn.Conv2d):
                raise ValueError(f"{name}.convs.{i} must be Sequential(Conv2d, BatchNorm2d, ReLU)")
            check_batchnorm(parts[1], f"{name}.convs.{i}.1")
            _checked_relu(parts[2], f"{name}.convs.{i}.2")
        for i, fc in enumerate([m.fc, *m.fcs]):
            check_conv(fc, f"{name}.fc" if i == 0 else f"{name}.fcs.{i - 1}", nn.Linear)
        if len(m.fcs) != len(branches):
            raise ValueError(f"{name}: {len(m.fcs)} fcs for {len(branches)} branches")
        conv = branches[0][0]
        _geometry([b[0] for b in branches], conv.in_channels, False, name)
        fused = cls(conv.out_channels, None, len(branches), conv.groups, 1, conv.stride[0], L=1,
                    backend=backend, device="meta")
        fused.convs, fused.fc, fused.fcs = copy.deepcopy(m.convs), copy.deepcopy(m.fc), copy.deepcopy(m.fcs)
        fused.in_channels = conv.in_channels
        fused._geometry()
        return fused.train(m.training)


class _ConvBn(nn.Module):
    """timm's ConvNormAct as far as state_dict keys go: ``conv`` then ``bn`` (the ReLU is fused)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(self.conv(x)))


class _SelectiveKernelAttn(nn.Module):
    """timm's SelectiveKernelAttn keys: fc_reduce (1x1), bn, act, fc_select (1x1 to M*C)."""

    def __init__(self, channels, num_paths, attn_channels, act_layer, norm_layer, factory, norm_factory):
        super().__init__()
        self.num_paths = num_paths
        self.fc_reduce = nn.Conv2d(channels, attn_channels, 1, bias=False, **factory)
        self.bn = norm_layer(attn_channels, **norm_factory)
        self.act = act_layer()
        self.fc_select = nn.Conv2d(attn_channels, channels * num_paths, 1, bias=False, **factory)

    def logits(self, gap: Tensor) -> Tensor:
        """(B, C) pooled sum of the paths -> (B, M*C) logits, path-major."""
        return self.fc_select(self.act(self.bn(self.fc_reduce(gap[:, :, None, None])))).flatten(1)


def _make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < round_limit * v else new_v


class FusedSelectiveKernel(_SelectiveKernelBase):
    """Drop-in timm ``SelectiveKernel`` (same arguments for the ReLU/BatchNorm case and the same
    state_dict keys: ``paths.{i}.conv``, ``paths.{i}.bn``, ``attn.fc_reduce``, ``attn.bn``,
    ``attn.fc_select``) on the fused kernels. ``kernel_size`` defaults to [3, 5]; with
    ``keep_3x3`` each becomes a 3x3 with dilation (k-1)/2. ``split_input``: path i reads the i-th
    of M input slices. Input NCHW or channels_last, output in the input's memory format.
    """

    def __init__(
        self, in_channels, out_channels=None, kernel_size=None, stride=1, dilation=1, groups=1,
        rd_ratio=1.0 / 16, rd_channels=None, rd_divisor=8, keep_3x3=True, split_input=True,
        act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d, aa_layer=None, drop_layer=None,
        *, backend="auto", device=None, dtype=None,
    ):
        super().__init__()
        if act_layer is not nn.ReLU:
            raise ValueError(f"act_layer must be nn.ReLU to be fused, got {act_layer!r}")
        if aa_layer is not None or drop_layer is not None:
            raise ValueError("aa_layer and drop_layer are not supported")
        factory = {"device": device, "dtype": dtype}
        # Only when given: norm layers such as torchvision's FrozenBatchNorm2d take no device or dtype.
        norm_factory = {k: v for k, v in factory.items() if v is not None}
        out_channels = out_channels or in_channels
        kernel_size = list(kernel_size or [3, 5])
        if keep_3x3:
            dilations = [dilation * (k - 1) // 2 for k in kernel_size]
            kernel_size = [3] * len(kernel_size)
        else:
            dilations = [dilation] * len(kernel_size)
        M = len(kernel_size)
        if split_input and in_channels % M:
            raise ValueError(f"split_input needs in_channels={in_channels} divisible by the {M} paths")
        path_in = in_channels // M if split_input else in_channels
        groups = min(out_channels, groups)
        self.backend = _backend.check_name(backend)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_paths, self.split_input = M, split_input
        self.paths = nn.ModuleList(
            _ConvBn(
                nn.Conv2d(path_in, out_channels, k, stride, ((stride - 1) + d * (k - 1)) // 2, d, groups=groups,
                          bias=False, **factory),
                check_batchnorm(norm_layer(out_channels, **norm_factory), "norm_layer"),
            )
            for k, d in zip(kernel_size, dilations)
        )
        attn_channels = rd_channels or _make_divisible(out_channels * rd_ratio, divisor=rd_divisor)
        self.attn = _SelectiveKernelAttn(out_channels, M, attn_channels, act_layer, norm_layer, factory, norm_factory)
        self._geometry()

    def extra_repr(self) -> str:
        return f"num_paths={self.num_paths}, split_input={self.split_input}, backend={self.backend!r}"

    def _convs(self):
        return [path.conv for path in self.paths]

    def _bns(self):
        return [check_batchnorm(path.bn, f"paths.{i}.bn") for i, path in enumerate(self.paths)]

    def _logits(self, gap: Tensor) -> Tensor:
        return self.attn.logits(gap)

    def _mlp(self):
        attn = self.attn
        if not is_folded(attn.bn) or type(attn.act) is not nn.ReLU:
            return None
        fc1, fc2 = attn.fc_reduce, attn.fc_select
        return fc1.weight.flatten(1), fc1.bias, attn.bn, True, fc2.weight.flatten(1), fc2.bias

    @classmethod
    def from_module(cls, m: nn.Module, backend: str = "auto") -> "FusedSelectiveKernel":
        """A FusedSelectiveKernel computing what timm's ``SelectiveKernel`` ``m`` computes (paths of
        ConvNormAct with ReLU, any attn.bn/act). Weights and buffers are copied (timm's BatchNormAct2d,
        SyncBatchNormAct and FrozenBatchNormAct2d become the plain norm, with the same keys); device,
        dtype and train/eval mode are kept."""
        name = type(m).__name__
        if not (hasattr(m, "paths") and hasattr(m, "attn")):
            raise TypeError(f"{name} is not a SelectiveKernel (paths, attn)")
        attn = m.attn
        for attr in ("fc_reduce", "bn", "act", "fc_select"):
            if not hasattr(attn, attr):
                raise ValueError(f"{name}.attn has no {attr}")
        for attr in ("fc_reduce", "fc_select"):
            check_conv(getattr(attn, attr), f"{name}.attn.{attr}")
        paths = []
        for i, path in enumerate(m.paths):
            if not isinstance(getattr(path, "conv", None), nn.Conv2d) or not hasattr(path, "bn"):
                raise ValueError(f"{name}.paths.{i} must have .conv (Conv2d) and .bn")
            for extra in ("aa", "drop"):
                if has_layer(path, extra):
                    kind = type(getattr(path, extra)).__name__
                    raise ValueError(f"{name}.paths.{i}.{extra} is {kind}; not supported")
            if hasattr(path, "act"):
                _checked_relu(path.act, f"{name}.paths.{i}.act")
            paths.append(_ConvBn(copy.deepcopy(path.conv), _plain_batchnorm(path.bn, f"{name}.paths.{i}.bn")))
        split_input = bool(getattr(m, "split_input", True))
        conv = paths[0].conv
        in_channels = conv.in_channels * (len(paths) if split_input else 1)
        _geometry([p.conv for p in paths], in_channels, split_input, name)
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.backend = _backend.check_name(backend)
        fused.in_channels, fused.out_channels = in_channels, conv.out_channels
        fused.num_paths, fused.split_input = len(paths), split_input
        fused.paths = nn.ModuleList(paths)
        fused.attn = _SelectiveKernelAttn.__new__(_SelectiveKernelAttn)
        nn.Module.__init__(fused.attn)
        fused.attn.num_paths = len(paths)
        for attr in ("fc_reduce", "bn", "act", "fc_select"):
            setattr(fused.attn, attr, copy.deepcopy(getattr(attn, attr)))
        return fused.train(m.training)
