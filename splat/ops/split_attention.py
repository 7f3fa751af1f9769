"""``splat::split_attention``: the whole split-attention tail after the conv, as one autograd node.

    pre  = bn0(y)                           y (B, R*C, H, W), BN0 per channel of y
    gap  = mean_hw(sum_r relu(pre_r))       (B, C)
    z    = fc2(act(bn1(fc1(gap))))          fc1, fc2: linear maps with ``cardinality`` groups
    attn = softmax over r of z              sigmoid for R == 1
    out  = sum_r attn_r * relu(pre_r)       (B, C, H, W) in y's layout, dtype ``out_dtype``

Channel orders. y's channel (r, c) is k*(R*C/K) + r*(C/K) + j with c = k*(C/K) + j and K =
``groups`` (1: radix-major, ResNeSt; the SK buffer of one grouped conv: K > 1). The logits z are
cardinal-major: (k, r, j) at k*(R*C/G) + r*(C/G) + j with G = ``cardinality`` (ResNeSt's fc2
output; SK's stacked fcs are G = 1, branch-major).

BN0 and BN1 are each given as (weight, bias, batch_stats, eps): with batch_stats, the batch's mean
and biased variance normalise before the affine map (training-mode BN; the op returns them so
that the caller updates running statistics); without, (weight, bias) *are* the affine map (eval
mode folded, or identity). ``relu`` applies ReLU after BN1.

Why one node: the backward of the separate ops (channel_stats, radix_pool, attention_sum) writes
three full-size gradients of y that autograd then adds, about 13 passes over y's size. Spanning
the tiny MLP lets the backward read y and dout twice and write dy once:
1. ``split_attention_backward_sums``: per (b, channel of y), dattn = sum_hw dout*relu(pre), the
   attention-weighted sums that give dscale and dshift, and sum_hw m*y, sum_hw m (m = [pre > 0]),
   which carry the pool's share of dscale and dshift once dgap is known;
2. the MLP backward on (B, C)-sized vectors, here in PyTorch, giving dgap;
3. ``split_attention_backward_dy``: BN0's backward per channel (the pool's share of dscale and
   dshift from dgap and the sums, then dweight and the batch statistics' share gamma + delta*y,
   in a reduction over the batch; a small kernel of its own), then
   dy = m*(scale*attn*dout + scale*dgap/(H*W)) + gamma + delta*y. It returns BN0's dweight and
   dbias too.
The conv output y and (B, C)-sized vectors are all the backward keeps: besides out and the batch
statistics, the raw op returns gap, the fc1 output, the hidden activation, the softmax (sigmoid)
probabilities and BN0's (scale, shift, rstd) with batch statistics (else empty), marked
non-differentiable, for its backward, which then recomputes none of them; ``split_attention``
below returns the first five.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from splat import _layout
from splat import backend as _backend
from splat.ops import _checks
from splat.ops.attention_sum import _torch_backward as _attention_sum_backward_reference
from splat.ops.attention_sum import _torch_forward as _attention_sum_reference
from splat.ops.channel_stats import _torch_forward as _channel_stats_reference
from splat.ops.channel_stats import bn_affine, bn_stats_share
from splat.ops.radix_pool import _torch_forward as _radix_pool_reference


def _regroup(t: Tensor, radix: int, src: int, dst: int) -> Tensor:
    """(B, R*C) with channel (r, c) at k*(R*C/K) + r*(C/K) + j, c = k*(C/K) + j, K = ``src`` -> the
    same with K = ``dst``; row-major, as the kernels index it."""
    if src == dst:
        return t.contiguous()
    B, RC = t.shape
    C = RC // radix
    rc = t.reshape(B, src, radix, C // src).transpose(1, 2).reshape(B, radix, dst, C // dst)
    return rc.transpose(1, 2).reshape(B, RC).contiguous()


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """x (B, G*i) -> (B, O) through weight (O, i) in G = ``groups`` diagonal blocks; row-major.
    One addmm (ungrouped) or one bmm/baddbmm: einsum costs the host about twice as much."""
    if groups == 1:
        return F.linear(x, weight, bias)
    B, O = x.shape[0], weight.shape[0]
    xg = x.reshape(B, groups, -1).transpose(0, 1)  # (G, B, i)
    wg = weight.reshape(groups, O // groups, -1).transpose(1, 2)  # (G, i, O/G)
    out = torch.bmm(xg, wg) if bias is None else torch.baddbmm(bias.reshape(groups, 1, O // groups), xg, wg)
    return out.transpose(0, 1).reshape(B, O)


def _linear_backward(dout: Tensor, x: Tensor, weight: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """(dx, dweight) of ``_linear``; dbias is dout.sum(0)."""
    if groups == 1:
        return dout.mm(weight), dout.t().mm(x)
    B, O = dout.shape
    d = dout.reshape(B, groups, O // groups).transpose(0, 1)  # (G, B, O/G)
    dx = torch.bmm(d, weight.reshape(groups, O // groups, -1))
    dw = torch.bmm(d.transpose(1, 2), x.reshape(B, groups, -1).transpose(0, 1))
    return dx.transpose(0, 1).reshape(x.shape), dw.reshape(weight.shape)


class _Mlp:
    """gap (B, C) -> attention weights (B, R*C) in y's order, keeping what the backward needs.

    The BN1 and activation steps run as single ATen ops (batch_norm, threshold_backward, ...)
    rather than their formulas: each call costs the host several microseconds in eager mode.
    ``saved`` = (z1, h, probs, mean1, var1), the fc1 output, the hidden activation, the softmax
    (sigmoid) probabilities and BN1's batch statistics (empty without) of the forward: given, the
    backward takes them instead of computing them again.
    """

    def __init__(self, gap, fc1_weight, fc1_bias, bn1_weight, bn1_bias, bn1_batch_stats, bn1_eps, relu,
                 fc2_weight, fc2_bias, radix, cardinality, groups, acc, saved=None):
        self.radix, self.cardinality, self.groups, self.relu = radix, cardinality, groups, relu
        self.gap = _layout.cast(gap, acc)
        self.fc1_weight, self.fc2_weight = _layout.cast(fc1_weight, acc), _layout.cast(fc2_weight, acc)
        self.bn1_weight, self.bn1_eps = _layout.cast(bn1_weight, acc), bn1_eps
        if saved is not None:
            self.z1, self.h, self.probs, *stats1 = saved
            self.stats1 = stats1 if bn1_batch_stats else None
            return
        self.stats1 = None
        self.z1 = _linear(self.gap, self.fc1_weight, _layout.cast(fc1_bias, acc), cardinality)
        bn1_bias = _layout.cast(bn1_bias, acc)
        if bn1_batch_stats:
            var1, mean1 = torch.var_mean(self.z1, dim=0, correction=0)
            self.stats1 = (mean1, var1)
            z2 = F.batch_norm(self.z1, mean1, var1, self.bn1_weight, bn1_bias, False, 0.0, bn1_eps)
        else:
            z2 = torch.addcmul(bn1_bias, self.z1, self.bn1_weight)
        self.h = torch.relu(z2) if relu else z2
        logits = _linear(self.h, self.fc2_weight, _layout.cast(fc2_bias, acc), cardinality)
        B, RC = logits.shape
        x = logits.reshape(B, cardinality, radix, RC // (radix * cardinality))
        self.probs = (torch.sigmoid(x) if radix == 1 else x.softmax(2)).reshape(B, RC)

    def attn(self) -> Tensor:
        """The weights (B, R*C) in y's channel order, row-major."""
        return _regroup(self.probs, self.radix, self.cardinality, self.groups)

    def backward(self, dattn: Tensor, dmean1: Tensor | None, dvar1: Tensor | None, biases: tuple[bool, bool]):
        """dattn (B, R*C) in y's order -> (dgap, dfc1_weight, dfc1_bias, dbn1_weight, dbn1_bias,
        dfc2_weight, dfc2_bias) in the accumulation dtype; the bias gradients None where ``biases``
        says fc1 or fc2 has none."""
        R, G = self.radix, self.cardinality
        B, RC = dattn.shape
        shape = (B, G, R, RC // (R * G))
        ds = _regroup(dattn, R, self.groups, G).view(shape)
        p = self.probs.reshape(shape)
        if R == 1:
            dlogits = torch.ops.aten.sigmoid_backward(ds, p)
        else:
            dlogits = torch.ops.aten._softmax_backward_data(ds, p, 2, p.dtype)
        dlogits = dlogits.reshape(B, RC)
        dh, dfc2_weight = _linear_backward(dlogits, self.h, self.fc2_weight, G)
        dz2 = torch.ops.aten.threshold_backward(dh, self.h, 0) if self.relu else dh
        if self.stats1 is None:
            dz1 = dz2 * self.bn1_weight
            dbn1_weight, dbn1_bias = (dz2 * self.z1).sum(0), dz2.sum(0)
        else:
            mean1, var1 = self.stats1
            dz1, dbn1_weight, dbn1_bias = torch.ops.aten.native_batch_norm_backward(
                dz2, self.z1, self.bn1_weight, None, None, mean1, torch.rsqrt(var1 + self.bn1_eps), True,
                self.bn1_eps, [True, True, True],
            )
            if dmean1 is not None:
                dz1 = dz1 + dmean1 / B
            if dvar1 is not None:
                dz1 = dz1 + (2 / B) * dvar1 * (self.z1 - mean1)
        dgap, dfc1_weight = _linear_backward(dz1, self.gap, self.fc1_weight, G)
        dfc1_bias = dz1.sum(0) if biases[0] else None
        dfc2_bias = dlogits.sum(0) if biases[1] else None
        return dgap, dfc1_weight, dfc1_bias, dbn1_weight, dbn1_bias, dfc2_weight, dfc2_bias


def _torch_backward_sums(dout: Tensor, y: Tensor, scale: Tensor, shift: Tensor, attn: Tensor, radix: int,
                         groups: int):
    _, dscale, dshift, dattn = _attention_sum_backward_reference(dout, y, scale, shift, attn, radix, groups)
    m = (y.to(scale.dtype) * scale[:, None, None] + shift[:, None, None] > 0).to(scale.dtype)
    return dscale, dshift, dattn.to(scale.dtype), (m * y.to(scale.dtype)).sum((2, 3)), m.sum((2, 3))


def _torch_backward_dy(dout: Tensor, y: Tensor, scale: Tensor, shift: Tensor, attn: Tensor, dgap: Tensor,
                       dscale: Tensor, dshift: Tensor, sum_my: Tensor, sum_m: Tensor, mean: Tensor, rstd: Tensor,
                       dmean: Tensor | None, dvar: Tensor | None, radix: int, groups: int):
    B, RC, H, W = y.shape
    C, K = RC // radix, groups
    # The pool's share of dy is dgap[b, c]/(H*W) for every radix r of channel c: in y's order
    # (B, K, R, C/K) that is a broadcast of dgap viewed as (B, K, 1, C/K). dgap may have any
    # strides (the op is public), so its products are reshaped, not viewed.
    pool = dgap.reshape(B, K, 1, C // K) * (1 / max(H * W, 1))  # an empty map's sums are zero
    dscale = dscale + (sum_my.reshape(B, K, radix, C // K) * pool).sum(0).reshape(RC)
    dshift = dshift + (sum_m.reshape(B, K, radix, C // K) * pool).sum(0).reshape(RC)
    dweight, gamma, delta = dscale, 0.0, 0.0
    if mean.numel():
        dweight, gamma, delta = bn_stats_share(dscale, dshift, scale, mean, rstd, dmean, dvar, B * H * W)
        gamma, delta = gamma[:, None, None], delta[:, None, None]
    alpha = (scale * attn)[:, :, None, None]
    beta = (pool * scale.view(K, radix, C // K)).reshape(B, RC)[:, :, None, None]
    y_acc = y.to(scale.dtype)
    m = y_acc * scale[:, None, None] + shift[:, None, None] > 0
    d = dout.to(scale.dtype).reshape(B, K, 1, C // K, H, W).expand(B, K, radix, C // K, H, W).reshape(B, RC, H, W)
    dy = m * (alpha * d + beta) + gamma + delta * y_acc
    return dy.to(y.dtype).contiguous(memory_format=_layout.memory_format(y)), dweight, dshift


def _split_attention_impl(
    y: Tensor, bn0_weight: Tensor, bn0_bias: Tensor, bn0_batch_stats: bool, bn0_eps: float,
    fc1_weight: Tensor, fc1_bias: Tensor | None, bn1_weight: Tensor, bn1_bias: Tensor, bn1_batch_stats: bool,
    bn1_eps: float, relu: bool, fc2_weight: Tensor, fc2_bias: Tensor | None, radix: int, cardinality: int,
    groups: int, out_dtype: torch.dtype, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    acc = _layout.acc_dtype(y.dtype)
    # Outputs may not alias each other or the inputs: a new empty tensor for each one not computed.
    mean0, var0, scale0, shift0, rstd0 = (y.new_empty(0, dtype=acc) for _ in range(5))
    if bn0_batch_stats:
        mean0, var0 = _backend.call(backend, "channel_stats_forward", _channel_stats_reference, y)
    scale, shift, rstd = bn_affine(bn0_weight, bn0_bias, bn0_batch_stats, bn0_eps, mean0, var0)
    if bn0_batch_stats:
        scale0, shift0, rstd0 = scale, shift, rstd
    gap = _backend.call(backend, "radix_pool_forward", _radix_pool_reference, y, scale, shift, radix, groups)
    with torch.autocast(y.device.type, enabled=False):
        mlp = _Mlp(gap, fc1_weight, fc1_bias, bn1_weight, bn1_bias, bn1_batch_stats, bn1_eps, relu,
                   fc2_weight, fc2_bias, radix, cardinality, groups, acc)
    out = _backend.call(
        backend, "attention_sum_forward", _attention_sum_reference,
        y, scale, shift, _layout.cast(mlp.attn(), out_dtype), radix, groups,
    )
    mean1, var1 = mlp.stats1 if mlp.stats1 is not None else (y.new_empty(0, dtype=acc) for _ in range(2))
    return (_layout.cast(out, out_dtype), mean0, var0, mean1, var1, gap, mlp.z1, mlp.h, mlp.probs, scale0, shift0,
            rstd0)


_split_attention = torch.library.custom_op("splat::split_attention", _split_attention_impl, mutates_args=())


@_split_attention.register_fake
def _fake(y, bn0_weight, bn0_bias, bn0_batch_stats, bn0_eps, fc1_weight, fc1_bias, bn1_weight, bn1_bias,
          bn1_batch_stats, bn1_eps, relu, fc2_weight, fc2_bias, radix, cardinality, groups, out_dtype, backend):
    B, RC, H, W = y.shape
    acc = _layout.acc_dtype(y.dtype)
    n0 = RC if bn0_batch_stats else 0
    n1 = fc1_weight.shape[0] if bn1_batch_stats else 0
    return (
        _layout.empty((B, RC // radix, H, W), y, dtype=out_dtype),
        y.new_empty(n0, dtype=acc), y.new_empty(n0, dtype=acc),
        y.new_empty(n1, dtype=acc), y.new_empty(n1, dtype=acc),
        y.new_empty((B, RC // radix)), y.new_empty((B, fc1_weight.shape[0]), dtype=acc),
        y.new_empty((B, fc1_weight.shape[0]), dtype=acc), y.new_empty((B, RC), dtype=acc),
        *(y.new_empty(n0, dtype=acc) for _ in range(3)),
    )


def fake_backward_sums(dout, y, scale, shift, attn, radix, groups):
    """Shapes of the first backward pass (``splat_cuda::split_attention_backward_sums`` shares it)."""
    B, RC = y.shape[:2]
    rows = lambda: y.new_empty((B, RC), dtype=scale.dtype)  # noqa: E731
    return torch.empty_like(scale), torch.empty_like(scale), rows(), rows(), rows()


def fake_backward_dy(dout, y, scale, shift, attn, dgap, dscale, dshift, sum_my, sum_m, mean, rstd, dmean, dvar,
                     radix, groups):
    """Shapes of the second backward pass (``splat_cuda::split_attention_backward_dy`` shares it)."""
    return _layout.empty(y.shape, y), torch.empty_like(scale), torch.empty_like(scale)


def _backward_sums_impl(
    dout: Tensor, y: Tensor, scale: Tensor, shift: Tensor, attn: Tensor, radix: int, groups: int, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backend.call(
        backend, "split_attention_backward_sums", _torch_backward_sums, dout, y, scale, shift, attn, radix, groups
    )


_backward_sums = torch.library.custom_op(
    "splat::split_attention_backward_sums", _backward_sums_impl, mutates_args=()
)
_backward_sums.register_fake(lambda *args: fake_backward_sums(*args[:-1]))


def _backward_dy_impl(
    dout: Tensor, y: Tensor, scale: Tensor, shift: Tensor, attn: Tensor, dgap: Tensor, dscale: Tensor,
    dshift: Tensor, sum_my: Tensor, sum_m: Tensor, mean: Tensor, rstd: Tensor, dmean: Tensor | None,
    dvar: Tensor | None, radix: int, groups: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _backend.call(
        backend, "split_attention_backward_dy", _torch_backward_dy,
        dout, y, scale, shift, attn, dgap, dscale, dshift, sum_my, sum_m, mean, rstd, dmean, dvar, radix, groups,
    )


_backward_dy = torch.library.custom_op("splat::split_attention_backward_dy", _backward_dy_impl, mutates_args=())
_backward_dy.register_fake(lambda *args: fake_backward_dy(*args[:-1]))


def _setup_context(ctx, inputs, output):
    (y, bn0_weight, bn0_bias, bn0_batch_stats, bn0_eps, fc1_weight, fc1_bias, bn1_weight, bn1_bias,
     bn1_batch_stats, bn1_eps, relu, fc2_weight, fc2_bias, radix, cardinality, groups, out_dtype, backend) = inputs
    _, mean0, var0, mean1, var1, *state = output
    # The forward's state for the backward, not results to differentiate.
    ctx.mark_non_differentiable(*state)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(y, bn0_weight, bn0_bias, fc1_weight, bn1_weight, bn1_bias, fc2_weight, mean0, var0, mean1,
                          var1, *state)
    ctx.has_bias = (fc1_bias is not None, fc2_bias is not None)
    ctx.bn0_batch_stats, ctx.bn1_batch_stats = bn0_batch_stats, bn1_batch_stats
    ctx.config = (bn0_eps, bn1_eps, relu, radix, cardinality, groups, out_dtype, backend)
    ctx.eager = False


def _backward(ctx, dout, dmean0, dvar0, dmean1, dvar1, *_):
    (y, bn0_weight, bn0_bias, fc1_weight, bn1_weight, bn1_bias, fc2_weight, mean0, var0, mean1, var1, gap, z1, h,
     probs, scale, shift, rstd) = ctx.saved_tensors
    bn0_eps, bn1_eps, relu, radix, cardinality, groups, out_dtype, backend = ctx.config
    acc = _layout.acc_dtype(y.dtype)
    B, RC, H, W = y.shape
    if not ctx.bn0_batch_stats:  # the affine map is (bn0_weight, bn0_bias) itself
        scale, shift, rstd = bn_affine(bn0_weight, bn0_bias, False, bn0_eps, mean0, var0)
    mlp = _Mlp(gap, fc1_weight, None, bn1_weight, None, ctx.bn1_batch_stats, bn1_eps, relu, fc2_weight, None,
               radix, cardinality, groups, acc, (z1, h, probs, mean1, var1))
    attn = _layout.cast(_layout.cast(mlp.attn(), out_dtype), acc)
    if dout is None:
        dout = torch.zeros((B, RC // radix, H, W), dtype=out_dtype, device=y.device)
    dout = dout.contiguous(memory_format=_layout.memory_format(y))
    backward_sums, backward_dy = (_backward_sums_impl, _backward_dy_impl) if ctx.eager else (_backward_sums, _backward_dy)
    dscale, dshift, dattn, sum_my, sum_m = backward_sums(dout, y, scale, shift, attn, radix, groups, backend)
    dgap, dfc1_weight, dfc1_bias, dbn1_weight, dbn1_bias, dfc2_weight, dfc2_bias = mlp.backward(
        dattn, dmean1, dvar1, ctx.has_bias
    )
    if not ctx.bn0_batch_stats:
        dmean0 = dvar0 = None  # gradients of the empty statistics, if any: nothing to add
    dy, dbn0_weight, dbn0_bias = backward_dy(
        dout, y, scale, shift, attn, dgap, dscale, dshift, sum_my, sum_m, mean0, rstd, dmean0, dvar0, radix, groups,
        backend,
    )
    grads = (dbn0_weight, dbn0_bias, dfc1_weight, dfc1_bias, dbn1_weight, dbn1_bias, dfc2_weight, dfc2_bias)
    params = (bn0_weight, bn0_bias, fc1_weight, fc1_weight, bn1_weight, bn1_bias, fc2_weight, fc2_weight)
    g0w, g0b, g1w, g1b, gbw, gbb, g2w, g2b = (_layout.cast(g, p.dtype) for g, p in zip(grads, params))
    return dy, g0w, g0b, None, None, g1w, g1b, gbw, gbb, None, None, None, g2w, g2b, None, None, None, None, None


_split_attention.register_autograd(_backward, setup_context=_setup_context)


def _eager() -> bool:
    """Nothing traces the call or intercepts the dispatcher (torch.compile, export, torch.jit.trace,
    a TorchDispatchMode such as FakeTensorMode): the ops' Python implementations may then run
    directly. Through torch.library, each call costs the host tens of microseconds more (argument
    and alias handling, quadratic in the arguments for the forward's 19): as much as the forward's
    own small ops. A trace must record the op itself: TorchScript cannot save a Python call."""
    return (
        not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and torch._C._len_torch_dispatch_stack() == 0
    )


class _EagerAutograd(torch.autograd.Function):
    """The op's registered setup_context and backward, around its implementation, for ``_eager()``
    calls; the backward then calls the two passes' implementations directly too. (Dynamo does not
    take ``set_materialize_grads`` inside an autograd.Function: compiled code goes through the op.)"""

    # ctx in forward rather than a separate setup_context: with one, apply binds the 19 arguments
    # to forward's signature through inspect on every call (over 100 us).
    @staticmethod
    def forward(ctx, *inputs):
        output = _split_attention_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.eager = True
        return output

    backward = staticmethod(_backward)


def split_attention(
    y: Tensor, *, bn0: tuple, fc1_weight: Tensor, fc1_bias: Tensor | None, bn1: tuple, relu: bool,
    fc2_weight: Tensor, fc2_bias: Tensor | None, radix: int, cardinality: int = 1, groups: int = 1,
    out_dtype: torch.dtype | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The split-attention tail (see the module docstring): returns (out, mean0, var0, mean1, var1).

    y (B, R*C, H, W) NCHW or NHWC; ``bn0`` = (weight, bias, batch_stats, eps) with (R*C,) vectors in
    y's channel order; fc1_weight (I, C/G), fc1_bias (I,) or None; ``bn1`` = (weight, bias,
    batch_stats, eps) with (I,) vectors; fc2_weight (R*C, I/G), fc2_bias (R*C,) or None (G =
    ``cardinality``). out (B, C, H, W) in y's layout, of ``out_dtype`` (default: promote(y, fc2_weight)).
    (mean0, var0) (R*C,) and (mean1, var1) (I,) are the batch statistics where batch_stats is set,
    else empty; the accumulation dtype.
    """
    C = _checks.conv_output(y, radix)
    _checks.divides(groups, C, "groups", "the channels per radix")
    _checks.divides(cardinality, C, "cardinality", "the channels per radix")
    bn0_weight, bn0_bias, bn0_batch_stats, bn0_eps = bn0
    bn1_weight, bn1_bias, bn1_batch_stats, bn1_eps = bn1
    for v, name in ((bn0_weight, "bn0 weight"), (bn0_bias, "bn0 bias")):
        _checks.vector(v, y, y.shape[1], name)
    _checks.rank(fc1_weight, 2, "fc1_weight")
    _checks.same_device(fc1_weight, y, "fc1_weight", "y")
    inter = fc1_weight.shape[0]
    _checks.divides(cardinality, inter, "cardinality", "fc1's output channels")
    if fc1_weight.shape[1] * cardinality != C:
        raise ValueError(f"fc1_weight must have shape ({inter}, {C // cardinality}), got {tuple(fc1_weight.shape)}")
    if fc1_bias is not None:
        _checks.vector(fc1_bias, y, inter, "fc1_bias")
    _checks.vector(bn1_weight, y, inter, "bn1 weight")
    _checks.vector(bn1_bias, y, inter, "bn1 bias")
    _checks.rank(fc2_weight, 2, "fc2_weight")
    _checks.same_device(fc2_weight, y, "fc2_weight", "y")
    if tuple(fc2_weight.shape) != (y.shape[1], inter // cardinality):
        raise ValueError(
            f"fc2_weight must have shape ({y.shape[1]}, {inter // cardinality}), got {tuple(fc2_weight.shape)}"
        )
    if fc2_bias is not None:
        _checks.vector(fc2_bias, y, y.shape[1], "fc2_bias")
    n0, n1 = y.shape[0] * y.shape[2] * y.shape[3], y.shape[0]
    for batch_stats, n, shape in ((bn0_batch_stats, n0, y.shape), (bn1_batch_stats, n1, (n1, inter, 1, 1))):
        if batch_stats and n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(shape)}")
    if out_dtype is None:
        out_dtype = torch.promote_types(y.dtype, fc2_weight.dtype)
    backend = _backend.resolve(backend, y, "split_attention")
    if not _eager():
        op = _split_attention
    elif torch.is_grad_enabled():
        op = _EagerAutograd.apply
    else:
        op = _split_attention_impl
    out, mean0, var0, mean1, var1, *_ = op(
        _layout.dense(y), bn0_weight.contiguous(), bn0_bias.contiguous(), bool(bn0_batch_stats), float(bn0_eps),
        fc1_weight.contiguous(), None if fc1_bias is None else fc1_bias.contiguous(), bn1_weight.contiguous(),
        bn1_bias.contiguous(), bool(bn1_batch_stats), float(bn1_eps), bool(relu), fc2_weight.contiguous(),
        None if fc2_bias is None else fc2_bias.contiguous(), radix, cardinality, groups, out_dtype, backend,
    )
    return out, mean0, var0, mean1, var1
