"""BatchNorm folded into a per-channel affine map that the fused kernels apply on the fly."""

import torch
from torch import Tensor, nn

from splat import _layout
from splat.modules._constants import constant
from splat.ops import channel_stats


_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def is_frozen_batchnorm(norm: nn.Module) -> bool:
    """Whether ``norm`` is a FrozenBatchNorm2d (torchvision's, detectron2's, timm's or
    :class:`FrozenBatchNorm2d`), recognised by class name and buffers wherever it was defined:
    a BatchNorm2d whose statistics and affine are fixed buffers, used in train mode too."""
    return (
        type(norm).__name__ == "FrozenBatchNorm2d"
        and all(isinstance(norm._buffers.get(b), Tensor) for b in _FROZEN_BUFFERS)
        and isinstance(getattr(norm, "eps", None), float)
    )


def is_naive_sync_batchnorm(norm: nn.Module) -> bool:
    """Whether ``norm`` is detectron2's NaiveSyncBatchNorm, recognised by class name wherever it was
    defined: a BatchNorm2d subclass that, training in a default process group of more than one,
    averages its statistics over the processes with arithmetic of its own, and is otherwise a
    BatchNorm2d."""
    return type(norm).__name__ == "NaiveSyncBatchNorm" and isinstance(norm, nn.BatchNorm2d)


def is_fusable_batchnorm(norm: nn.Module) -> bool:
    """Whether the fused blocks take ``norm``: BatchNorm2d, SyncBatchNorm, detectron2's
    NaiveSyncBatchNorm or a FrozenBatchNorm2d (not subclasses that add layers). The kernels fold
    it, except a synchronised norm while it ``synchronises``."""
    plain = type(norm) in (nn.BatchNorm2d, nn.SyncBatchNorm)
    return plain or is_naive_sync_batchnorm(norm) or is_frozen_batchnorm(norm)


def check_batchnorm(norm: nn.Module, name: str) -> nn.Module:
    """``norm`` if the fused blocks take it (see ``is_fusable_batchnorm``), else ValueError naming it."""
    if not is_fusable_batchnorm(norm):
        raise ValueError(
            f"{name}: only torch.nn.BatchNorm2d, SyncBatchNorm, NaiveSyncBatchNorm or a FrozenBatchNorm2d can be "
            f"fused, got {type(norm).__name__}"
        )
    return norm


def check_norm_names(m: nn.Module, indices: tuple[int, ...], name: str) -> None:
    """OpenMMLab adds a block's norm i under a name after its type (``norm<i>_name``: bn1, gn1, ...);
    the fused blocks keep the state_dict keys bn<i>, so ValueError for a norm by any other name
    (naming its type first, if the blocks do not take that)."""
    for i in indices:
        attr = getattr(m, f"norm{i}_name", f"bn{i}")
        if attr != f"bn{i}":
            check_batchnorm(getattr(m, attr), f"{name}.{attr}")
            raise ValueError(f"{name}.{attr}: the norm must be named bn{i}")


def synchronises(norm: nn.Module) -> bool:
    """Whether ``norm`` is a SyncBatchNorm (its process group) or a NaiveSyncBatchNorm (the default
    group) that, called now, would reduce its batch statistics over a process group of more than one
    (training under torch.distributed). The blocks then run it as the module it is, and the kernels
    see its output; otherwise it is a BatchNorm2d and is folded."""
    if not norm.training or not (type(norm) is nn.SyncBatchNorm or is_naive_sync_batchnorm(norm)):
        return False
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return torch.distributed.get_world_size(getattr(norm, "process_group", None) or torch.distributed.group.WORLD) > 1


def is_folded(norm: nn.Module) -> bool:
    """Whether the kernels fold ``norm`` into their affine map now: a fusable norm that does not
    ``synchronise`` (one that does runs as its module)."""
    return is_fusable_batchnorm(norm) and not synchronises(norm)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine, (C,) buffers ``weight``, ``bias``,
    ``running_mean``, ``running_var`` (the keys of torchvision's and timm's FrozenBatchNorm2d):
    y = x * scale + (bias - running_mean * scale), scale = weight / sqrt(running_var + eps).
    What timm's FrozenBatchNormAct2d becomes inside a fused block, whose kernels apply the ReLU."""

    def __init__(self, num_features: int, eps: float = 1e-5, *, device=None, dtype=None):
        super().__init__()
        self.num_features, self.eps = num_features, float(eps)
        factory = {"device": device, "dtype": dtype}
        for name, fill in zip(_FROZEN_BUFFERS, (1.0, 0.0, 0.0, 1.0)):
            self.register_buffer(name, torch.full((num_features,), fill, **factory))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def uses_batch_stats(bn: nn.Module) -> bool:
    """Whether the fusable norm ``bn`` normalises with the batch's statistics (else its running ones)."""
    return not is_frozen_batchnorm(bn) and (bn.training or not bn.track_running_stats)


def num_channels(bn: nn.Module) -> int:
    """The channel count of a fusable norm (torchvision's FrozenBatchNorm2d has no num_features)."""
    return bn.weight.numel() if is_frozen_batchnorm(bn) else bn.num_features


def normalized_dtype(y: Tensor, bns: list[nn.Module]) -> torch.dtype:
    """The dtype of the original block's bn(y), y (B > 0, C, H, W) and ``bns`` the fusable norms
    over its channels. BatchNorm2d keeps y's dtype. A FrozenBatchNorm2d is plain arithmetic on its
    buffers: under autocast torchvision's promotes a bfloat16 y to its float32 buffers while
    detectron2's casts back, so where the dtypes differ its own forward is asked, on one pixel."""
    dtype = y.dtype
    for bn in bns:
        if is_frozen_batchnorm(bn) and bn.weight.dtype != y.dtype:
            with torch.no_grad():
                dtype = torch.promote_types(dtype, bn(y[:1, : num_channels(bn), :1, :1]).dtype)
    return dtype


def update_running_stats(updates: list[tuple[nn.BatchNorm2d, Tensor, Tensor, int]]) -> None:
    """What nn.BatchNorm2d does in training, for each (bn, batch mean, biased batch var, values per
    channel n) of ``updates`` whose bn is training and tracks statistics: momentum (or the
    cumulative average when it is None) and the unbiased variance for running_var.

    A block updates several BNs a step. Where they share a momentum and their buffers have the
    statistics' dtype, as usual, all of them update in three multi-tensor ops (as optimizers
    update parameters): each op costs the host a launch in eager mode, and one BN alone took four.
    """
    updates = [u for u in updates if uses_batch_stats(u[0]) and u[0].track_running_stats]
    if not updates:
        return
    momentum = updates[0][0].momentum
    with torch.no_grad():
        torch._foreach_add_([bn.num_batches_tracked for bn, *_ in updates], 1)
        if momentum is not None and all(
            bn.momentum == momentum and bn.running_mean.dtype == bn.running_var.dtype == mean.dtype
            for bn, mean, _, _ in updates
        ):
            unbiased = torch._foreach_mul([var for _, _, var, _ in updates], [n / (n - 1) for *_, n in updates])
            buffers = [b for bn, *_ in updates for b in (bn.running_mean, bn.running_var)]
            batches = [t for (_, mean, _, _), var in zip(updates, unbiased) for t in (mean, var)]
            torch._foreach_lerp_(buffers, batches, momentum)
            return
        for bn, mean, var, n in updates:
            factor = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.to(mean.dtype)
            for buffer, batch in ((bn.running_mean, mean), (bn.running_var, var * (n / (n - 1)))):
                if buffer.dtype == batch.dtype:
                    buffer.lerp_(batch, factor)
                else:  # e.g. bfloat16 buffers: update in the statistics' float32, then round once
                    buffer.copy_(buffer.to(batch.dtype).lerp_(batch, factor))


def _identity(channels: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Ones and zeros (channels,) in the accumulation dtype of ``like``, on its device."""
    acc = _layout.acc_dtype(like.dtype)

    def make():
        ones = torch.ones(channels, dtype=acc, device=like.device)
        return ones, torch.zeros_like(ones)

    return constant(("identity", channels, acc, like.device), make)


def _affine(bn: nn.BatchNorm2d, like: Tensor) -> tuple[Tensor, Tensor]:
    """bn's (weight, bias) in the accumulation dtype of ``like``: ones and zeros without affine."""
    if bn.weight is not None:  # affine, or frozen (its buffers)
        acc = _layout.acc_dtype(like.dtype)
        return _layout.cast(bn.weight, acc), _layout.cast(bn.bias, acc)
    return _identity(num_channels(bn), like)


def _fold(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, shift) with bn(y) == y * scale + shift, normalising with (mean, var)."""
    weight, bias = _affine(bn, like)
    scale = torch.rsqrt(var + bn.eps) * weight
    return scale, torch.addcmul(bias, mean, scale, value=-1)


def batch_norm_scale_shift(
    y: Tensor, bns: list[nn.BatchNorm2d], backend: str, order: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(scale, shift), each (C,) in y's accumulation dtype, with bn(y) == y * scale + shift.

    y (B, C, H, W); ``bns`` cover y's channels in order (one BN for a SplAtConv2d, one per
    branch for SK; none: no normalisation). Batch statistics come from ``splat::channel_stats``,
    so gradients reach y through them; running statistics are updated as nn.BatchNorm2d updates them.

    ``order`` (optional, (C,) int64 on y's device): y's channel q holds channel ``order[q]`` of
    the concatenated BNs (one grouped conv that interleaves SK's branches); scale and shift are
    then returned in y's channel order.
    """
    if not bns:
        return _identity(y.shape[1], y)
    n = y.shape[0] * y.shape[2] * y.shape[3]
    batch_mean = batch_var = None
    if any(uses_batch_stats(bn) for bn in bns):
        if n <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(y.shape)}"
            )
        batch_mean, batch_var = channel_stats(y, backend)
        if order is not None:
            inverse = torch.argsort(order)
            batch_mean, batch_var = batch_mean[inverse], batch_var[inverse]
        update_running_stats(batch_updates(bns, batch_mean.detach(), batch_var.detach(), n))
    scales, shifts, start = [], [], 0
    for bn in bns:
        channels = slice(start, start + num_channels(bn))
        start += num_channels(bn)
        if uses_batch_stats(bn):
            scale, shift = _fold(bn, batch_mean[channels], batch_var[channels], y)
        else:
            scale, shift = _running_fold(bn, y)
        scales.append(scale)
        shifts.append(shift)
    if start != y.shape[1]:
        raise ValueError(f"the BatchNorms cover {start} channels but y has {y.shape[1]}")
    scale, shift = (scales[0], shifts[0]) if len(bns) == 1 else (torch.cat(scales), torch.cat(shifts))
    if order is not None:
        return scale[order], shift[order]
    return scale, shift


def _running_fold(bn: nn.BatchNorm2d, like: Tensor) -> tuple[Tensor, Tensor]:
    """``_fold`` with bn's running statistics (eval mode)."""
    acc = _layout.acc_dtype(like.dtype)
    return _fold(bn, _layout.cast(bn.running_mean, acc), _layout.cast(bn.running_var, acc), like)


def split_attention_bn(bns: list[nn.BatchNorm2d], like: Tensor, order: Tensor | None = None):
    """``bns`` as the (weight, bias, batch_stats, eps) argument of ``splat::split_attention``, vectors
    in the accumulation dtype of ``like`` and (with ``order``, see ``batch_norm_scale_shift``) in
    its channel order; None when one such tuple cannot express them (mixed modes or eps).
    Eval-mode BNs are folded into the affine map; no BNs are no normalisation of like's channels."""
    if not bns:
        return identity_bn(like.shape[1], like)
    modes = {uses_batch_stats(bn) for bn in bns}
    if len(modes) != 1 or len({bn.eps for bn in bns}) != 1:
        return None
    batch_stats = modes.pop()
    pairs = [_affine(bn, like) if batch_stats else _running_fold(bn, like) for bn in bns]
    weight, bias = pairs[0] if len(bns) == 1 else (torch.cat(vectors) for vectors in zip(*pairs))
    if order is not None:
        weight, bias = weight[order], bias[order]
    return weight, bias, batch_stats, bns[0].eps


def identity_bn(channels: int, like: Tensor) -> tuple:
    """The (weight, bias, batch_stats, eps) of no normalisation over ``channels`` channels."""
    return *_identity(channels, like), False, 0.0


def batch_updates(bns: list[nn.BatchNorm2d], mean: Tensor, var: Tensor, n: int, order: Tensor | None = None) -> list:
    """``update_running_stats``'s (bn, mean, var, n) for ``bns`` from the batch (mean, var) that
    ``splat::split_attention`` returned in y's channel order (``order`` as in
    ``split_attention_bn``); none when the statistics are empty."""
    if mean.numel() == 0:
        return []
    if order is not None:
        inverse = torch.argsort(order)
        mean, var = mean[inverse], var[inverse]
    updates, start = [], 0
    for bn in bns:
        channels = slice(start, start + num_channels(bn))
        start += num_channels(bn)
        updates.append((bn, mean, var, n) if len(bns) == 1 else (bn, mean[channels], var[channels], n))
    return updates
