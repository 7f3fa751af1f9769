"""``splat::res2net_chain``: the multi-scale 3x3 stage of a Res2Net bottleneck in one op.

x (B, width*scale, H, W), NCHW or NHWC, is the activated conv1 output; its channel slot ``i``
(channels ``[i*width, (i+1)*width)``) is the split ``spx[i]``. With ``nums = max(1, scale - 1)``:

    'normal' (stage=False):  sp_0 = x_0,  sp_i = sp_{i-1}' + x_i
    'stage'  (stage=True):   sp_i = x_i                          (independent branches)
    y_i      = conv3x3(sp_i, weight[i*width:(i+1)*width])     stride, padding = dilation = dilation, groups
    sp_i'    = relu((y_i - mean_i) * rsqrt(var_i + eps) * gamma_i + beta_i)        -> out slot i
    out slot nums (scale > 1) = x_nums ('normal') or avg_pool2d(x_nums, 3, stride, 1) ('stage')

out is (B, width*scale, H', W') in x's layout and dtype; ``weight`` (nums*width, width/groups, 3, 3)
is the concatenation of the branch convs' weights, ``gamma``/``beta`` (nums*width,) the BN affine.
With ``batch_stats`` (training-mode BN) (mean, var) are the batch mean and biased variance of each
y channel over (B, H', W'); otherwise ``running_mean``/``running_var`` are used. Both are returned,
(nums*width,) in the accumulation dtype, so the caller can update running statistics.
y (B, nums*width, H', W'), the raw conv outputs, is kept for the backward when ``save_y``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from splat import _layout
from splat import backend as _backend
from splat.ops import _checks


def output_size(size: int, stride: int) -> int:
    """Spatial output size of the branch convs (3x3, padding = dilation) and of the stage pool."""
    return (size - 1) // stride + 1


def _normalise(y: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor, eps: float, batch_stats: bool):
    acc = _layout.acc_dtype(y.dtype)
    y_acc = y.to(acc)
    if batch_stats and y.numel() == 0:
        mean = var = y_acc.new_full((y.shape[1],), float("nan"))
    elif batch_stats:
        var, mean = torch.var_mean(y_acc, dim=(0, 2, 3), correction=0)
    rstd = torch.rsqrt(var + eps)
    pre = (y_acc - mean[:, None, None]) * (rstd * gamma.to(acc))[:, None, None] + beta.to(acc)[:, None, None]
    return torch.relu(pre).to(y.dtype), mean, var


def _torch_forward(x, weight, gamma, beta, running_mean, running_var, eps, scale, stage, stride, dilation, groups,
                   batch_stats, save_y):
    B, C, H, W = x.shape
    width = C // scale
    nums = weight.shape[0] // width
    acc = _layout.acc_dtype(x.dtype)
    Ho, Wo = output_size(H, stride), output_size(W, stride)
    out = _layout.empty((B, C, Ho, Wo), x)
    y = _layout.empty((B, nums * width, Ho, Wo), x) if save_y else x.new_empty(0)
    mean = _layout.empty((nums * width,), x, dtype=acc)
    var = _layout.empty((nums * width,), x, dtype=acc)
    conv = dict(stride=stride, padding=dilation, dilation=dilation)
    # 'stage' branches are independent: one grouped conv covers them all.
    steps = [slice(0, nums * width)] if stage else [slice(i * width, (i + 1) * width) for i in range(nums)]
    for i, ch in enumerate(steps):
        sp = x[:, ch] if stage or i == 0 else x[:, ch] + out[:, steps[i - 1]]
        yi = F.conv2d(sp, weight[ch], None, groups=groups * (nums if stage else 1), **conv)
        out[:, ch], mean[ch], var[ch] = _normalise(
            yi, gamma[ch], beta[ch], running_mean[ch], running_var[ch], eps, batch_stats
        )
        if save_y:
            y[:, ch] = yi
    if scale > 1:
        last = x[:, nums * width:]
        out[:, nums * width:] = F.avg_pool2d(last, 3, stride, 1) if stage else last
    return out, y, mean, var


def _torch_backward(dout, x, weight, gamma, out, y, mean, var, eps, scale, stage, stride, dilation, groups,
                    batch_stats):
    B, C, H, W = x.shape
    width = C // scale
    nums = weight.shape[0] // width
    acc = _layout.acc_dtype(x.dtype)
    n = B * out.shape[2] * out.shape[3]
    dx = _layout.empty(x.shape, x)
    dweight = torch.empty_like(weight)
    dgamma = torch.empty(nums * width, dtype=acc, device=x.device)
    dbeta = torch.empty_like(dgamma)
    rstd = torch.rsqrt(var + eps)
    g = gamma.to(acc) * rstd
    steps = [slice(0, nums * width)] if stage else [slice(i * width, (i + 1) * width) for i in range(nums)]
    carry = None
    for i in reversed(range(len(steps))):
        ch = steps[i]
        dsp = dout[:, ch].to(acc)
        if carry is not None:
            dsp = dsp + carry
        dpre = dsp * (out[:, ch] > 0)
        xhat = (y[:, ch].to(acc) - mean[ch, None, None]) * rstd[ch, None, None]
        dbeta[ch] = dpre.sum((0, 2, 3))
        dgamma[ch] = (dpre * xhat).sum((0, 2, 3))
        if batch_stats:
            dpre = dpre - dbeta[ch, None, None] / n - xhat * (dgamma[ch, None, None] / n)
        dy = (dpre * g[ch, None, None]).to(x.dtype)
        sp = x[:, ch] if stage or i == 0 else x[:, ch] + out[:, steps[i - 1]]
        dsp_in, dweight[ch], _ = torch.ops.aten.convolution_backward(
            dy, sp, weight[ch], None, [stride, stride], [dilation, dilation], [dilation, dilation],
            False, [0, 0], groups * (nums if stage else 1), [True, True, False],
        )
        dx[:, ch] = dsp_in
        carry = None if stage or i == 0 else dsp_in.to(acc)
    if scale > 1:
        dlast = dout[:, nums * width:]
        if stage:
            dlast = torch.ops.aten.avg_pool2d_backward(
                dlast, x[:, nums * width:], [3, 3], [stride, stride], [1, 1], False, True, None
            )
        dx[:, nums * width:] = dlast
    return dx, dweight, dgamma.to(gamma.dtype), dbeta.to(gamma.dtype)


@torch.library.custom_op("splat::res2net_chain", mutates_args=())
def _res2net_chain(
    x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor, running_var: Tensor,
    eps: float, scale: int, stage: bool, stride: int, dilation: int, groups: int, batch_stats: bool,
    save_y: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backend.call(
        backend, "res2net_chain_forward", _torch_forward, x, weight, gamma, beta, running_mean, running_var,
        eps, scale, stage, stride, dilation, groups, batch_stats, save_y,
    )


def fake_forward(x, weight, gamma, beta, running_mean, running_var, eps, scale, stage, stride, dilation, groups,
                 batch_stats, save_y):
    """Shapes of the forward kernels (``splat_cuda::res2net_chain_forward`` shares it)."""
    B, C, H, W = x.shape
    Ho, Wo = output_size(H, stride), output_size(W, stride)
    acc = _layout.acc_dtype(x.dtype)
    y = _layout.empty((B, weight.shape[0], Ho, Wo), x) if save_y else x.new_empty(0)
    stats = (x.new_empty(weight.shape[0], dtype=acc), x.new_empty(weight.shape[0], dtype=acc))
    return (_layout.empty((B, C, Ho, Wo), x), y, *stats)


_res2net_chain.register_fake(lambda *args: fake_forward(*args[:-1]))


@torch.library.custom_op("splat::res2net_chain_backward", mutates_args=())
def _res2net_chain_backward(
    dout: Tensor, x: Tensor, weight: Tensor, gamma: Tensor, out: Tensor, y: Tensor, mean: Tensor, var: Tensor,
    eps: float, scale: int, stage: bool, stride: int, dilation: int, groups: int, batch_stats: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backend.call(
        backend, "res2net_chain_backward", _torch_backward, dout, x, weight, gamma, out, y, mean, var,
        eps, scale, stage, stride, dilation, groups, batch_stats,
    )


def fake_backward(dout, x, weight, gamma, out, y, mean, var, eps, scale, stage, stride, dilation, groups, batch_stats):
    """Shapes of the backward kernels (``splat_cuda::res2net_chain_backward`` shares it)."""
    return _layout.empty(x.shape, x), torch.empty_like(weight), torch.empty_like(gamma), torch.empty_like(gamma)


_res2net_chain_backward.register_fake(lambda *args: fake_backward(*args[:-1]))


def _setup_context(ctx, inputs, output):
    x, weight, gamma, _, _, _, eps, scale, stage, stride, dilation, groups, batch_stats, _, backend = inputs
    out, y, mean, var = output
    ctx.save_for_backward(x, weight, gamma, out, y, mean, var)
    ctx.args = (eps, scale, stage, stride, dilation, groups, batch_stats, backend)
    ctx.mark_non_differentiable(y, mean, var)


def _backward(ctx, dout, _dy, _dmean, _dvar):
    x, weight, gamma, out, y, mean, var = ctx.saved_tensors
    if y.dim() != 4:
        raise RuntimeError("res2net_chain was run with save_y=False; its backward needs the conv outputs")
    dout = dout.contiguous(memory_format=_layout.memory_format(out))
    dx, dweight, dgamma, dbeta = _res2net_chain_backward(dout, x, weight, gamma, out, y, mean, var, *ctx.args)
    return dx, dweight, dgamma, dbeta, None, None, None, None, None, None, None, None, None, None, None


_res2net_chain.register_autograd(_backward, setup_context=_setup_context)


def _positive_int(v, name: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def res2net_chain(
    x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor, running_var: Tensor,
    eps: float, scale: int, stage: bool = False, stride: int = 1, dilation: int = 1, groups: int = 1,
    batch_stats: bool = True, save_y: bool = True, backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, mean, var) of the Res2Net 3x3 stage. See the module docstring for shapes and semantics.

    ``running_mean``/``running_var`` are read only without ``batch_stats``; statistics are never
    updated here (the caller does that from the returned batch mean and biased variance).
    """
    _checks.rank(x, 4, "x")
    _checks.rank(weight, 4, "weight")
    _positive_int(scale, "scale")
    _positive_int(stride, "stride")
    _positive_int(dilation, "dilation")
    _positive_int(groups, "groups")
    _checks.divides(scale, x.shape[1], "scale", "the channel count of x")
    width = x.shape[1] // scale
    nums = max(1, scale - 1)
    _checks.divides(groups, width, "groups", "width")
    if tuple(weight.shape) != (nums * width, width // groups, 3, 3):
        raise ValueError(f"weight must have shape {(nums * width, width // groups, 3, 3)}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    _checks.same_device(weight, x, "weight", "x")
    if not stage and stride > 1 and scale > 1:
        raise ValueError("stride > 1 needs stage=True: a 'normal' chain adds splits of different sizes")
    acc = _layout.acc_dtype(x.dtype)
    for v, name in ((gamma, "gamma"), (beta, "beta"), (running_mean, "running_mean"), (running_var, "running_var")):
        _checks.rank(v, 1, name)
        _checks.same_device(v, x, name, "x")
        if v.shape[0] != nums * width:
            raise ValueError(f"{name} must have {nums * width} elements, got {v.shape[0]}")
    for v, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if v.dtype != acc:
            raise TypeError(f"{name} must be {acc} for x of dtype {x.dtype}, got {v.dtype}")
    if batch_stats and x.shape[0] * output_size(x.shape[2], stride) * output_size(x.shape[3], stride) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    backend = _backend.resolve(backend, x, "res2net_chain")
    out, _, mean, var = _res2net_chain(
        _layout.dense(x), weight.contiguous(), gamma.contiguous(), beta.contiguous(), running_mean.contiguous(),
        running_var.contiguous(), float(eps), scale, bool(stage), stride, dilation, groups, bool(batch_stats),
        bool(save_y or batch_stats), backend,
    )
    return out, mean, var
