"""Reference norms of the detection and timm worlds: FrozenBatchNorm2d (torchvision's layout and
arithmetic), detectron2's NaiveSyncBatchNorm, timm's BatchNormAct2d / SyncBatchNormAct /
FrozenBatchNormAct2d (the activation inside the norm), and
``freeze``, which does what timm's ``freeze_batch_norm_2d`` does to a model, and ``naive_sync``."""

import copy

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine, all buffers, in train mode too. Under autocast
    the float32 buffers promote a bfloat16 input, as torchvision's do."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + bias


class _SumOverProcesses(torch.autograd.Function):
    """all_reduce (sum) whose gradient is the sum of the processes' gradients."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """detectron2's NaiveSyncBatchNorm: training in a process group of more than one (the default
    group), the batch mean and mean of squares are averaged over the processes (each process's batch
    weighs the same), normalisation uses the biased variance E[x^2] - E[x]^2, and so does
    running_var's update (num_batches_tracked stays); otherwise it is a BatchNorm2d."""

    def forward(self, x):
        if not (self.training and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return super().forward(x)
        world = torch.distributed.get_world_size()
        stats = _SumOverProcesses.apply(torch.cat([x.mean((0, 2, 3)), (x * x).mean((0, 2, 3))])) / world
        mean, mean_sq = stats.split(x.shape[1])
        var = mean_sq - mean * mean
        scale = self.weight * (var + self.eps).rsqrt()
        shift = self.bias - mean * scale
        with torch.no_grad():
            self.running_mean += self.momentum * (mean - self.running_mean)
            self.running_var += self.momentum * (var - self.running_var)
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: act(drop(bn(x))), with the state_dict keys of a BatchNorm2d."""

    def __init__(self, num_features, act_layer=nn.ReLU):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm's SyncBatchNormAct: act(drop(sync_bn(x)))."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """timm's FrozenBatchNormAct2d: act(drop(frozen_bn(x)))."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__(num_features, eps)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def _frozen_copy(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    frozen = (FrozenBatchNormAct2d if hasattr(bn, "act") else FrozenBatchNorm2d)(bn.num_features, bn.eps)
    if hasattr(bn, "act"):
        frozen.drop, frozen.act = copy.deepcopy(bn.drop), copy.deepcopy(bn.act)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(bn, name) is not None:
                getattr(frozen, name).copy_(getattr(bn, name))
    return frozen.to(bn.running_mean.device, bn.running_mean.dtype)


def freeze(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d (BatchNormAct2d) inside replaced, in place, by a
    FrozenBatchNorm2d (FrozenBatchNormAct2d) holding its statistics and affine."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, _frozen_copy(child))
        else:
            freeze(child)
    return module


def naive_sync(module: nn.Module) -> nn.Module:
    """``module`` with every nn.BatchNorm2d inside (exactly that class) replaced, in place, by a
    NaiveSyncBatchNorm with its state, as detectron2 builds a backbone with norm "naiveSyncBN"."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = NaiveSyncBatchNorm(child.num_features, child.eps, child.momentum)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync.to(child.running_mean.device, child.running_mean.dtype).train(child.training))
        else:
            naive_sync(child)
    return module
