"""Edge cases of the split-attention path: extreme values, huge tensors, CUDA graphs, determinism."""

import pytest
import torch

import splat
from splat import ops
from tests.helpers import DEVICE, backend_params, cuda_graph_step, rand
from tests.reference import SplAtConv2d
from tests.test_ops import expected_attention_sum, expected_pool

GPU_BACKENDS = [b for b in ("triton", "cuda") if splat.backends()[b][0]]


@pytest.mark.parametrize("backend", backend_params())
def test_float16_near_top_of_range(backend):
    """Values near 65504: the sums over radix and H*W exceed float16, the float32 accumulators don't,
    and results that fit in float16 come out right."""
    y = (rand(2, 8, 5, 5).abs() * 1e4 + 5e4).clamp(max=65000).half()
    scale = torch.full((8,), 0.5, device=DEVICE)
    shift = torch.zeros(8, device=DEVICE)
    attn = torch.full((2, 8), 0.5, device=DEVICE, dtype=torch.float16)
    exact = [t.double() for t in (y, scale, shift)]
    gap = ops.radix_pool(y, scale, shift, 2, backend)
    torch.testing.assert_close(gap.double(), expected_pool(*exact, 2), rtol=1e-3, atol=0)
    out = ops.attention_sum(y, scale * 2, shift, attn, 2, backend)
    expected = expected_attention_sum(exact[0], exact[1] * 2, exact[2], attn.double(), 2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_relu_mask_where_pre_rounds_to_zero(backend):
    """Where y * scale + shift is exactly 0 as torch rounds it (shift = -fl(y * scale)), the ReLU's
    gradient mask is 0. A fused multiply-add would get the product's rounding error instead, a
    mask of 1 at about half of those pixels, and gradients where the reference has none."""
    y = rand(4, 16, 3, 3, dtype=torch.float32)
    scale = torch.rand(16, device=DEVICE) + 0.5
    shift = -(y[0, :, 1, 1] * scale)
    assert (y[0, :, 1, 1] * scale + shift == 0).all()
    fused = y[0, :, 1, 1].double() * scale.double() + shift.double()  # what an FMA computes, then rounds
    assert (fused > 0).any(), "no pixel where a fused multiply-add would flip the mask"
    dout = rand(4, 8, 3, 3, dtype=torch.float32)
    attn = torch.rand(4, 16, device=DEVICE)
    for name, fn in {
        "radix_pool": lambda y, be: ops.radix_pool(y, scale, shift, 2, be).sum(),
        "attention_sum": lambda y, be: (ops.attention_sum(y, scale, shift, attn, 2, be) * dout).sum(),
    }.items():
        dy = {}
        for be in (backend, "torch"):
            leaf = y.detach().requires_grad_()
            fn(leaf, be).backward()
            dy[be] = leaf.grad[0, :, 1, 1]
        assert (dy["torch"] == 0).all(), name
        torch.testing.assert_close(dy[backend], dy["torch"], rtol=0, atol=0, msg=name)


# Tensors of several GB: one at a time when gpu_check.sh runs the suite on parallel workers.
GIANT = pytest.mark.xdist_group("giant-tensors")


@pytest.mark.gpu
@GIANT
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_31_elements(backend):
    """64-bit addressing: a bf16 conv output of 2**31 + 2**20 elements; checked on its last batch item."""
    B, R, C, H, W = 2, 2, 64, 4097, 2049  # 2 * 128 * 4097 * 2049 > 2**31
    y = torch.randn(B, R * C, H, W, device="cuda", dtype=torch.bfloat16)
    assert y.numel() > 2**31
    scale = torch.rand(R * C, device="cuda") + 0.5
    shift = torch.randn(R * C, device="cuda")
    attn = torch.rand(B, R * C, device="cuda")
    gap = ops.radix_pool(y, scale, shift, R, backend)
    out = ops.attention_sum(y, scale, shift, attn, R, backend)
    last = y[-1:].float()
    torch.testing.assert_close(gap[-1:].float(), expected_pool(last, scale, shift, R), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(
        out[-1:, :, -8:].float(), expected_attention_sum(last[:, :, -8:], scale, shift, attn[-1:], R), rtol=2e-2, atol=2e-2
    )


@pytest.mark.gpu
@GIANT
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_map_of_more_than_2_31_pixels(backend):
    """One map of 46341 x 46341 > 2**31 pixels, a ramp along H*W so that a chunk of the map left
    out or counted twice shows: channel statistics, the pool and its backward against float64 sums."""
    R, C, side = 2, 1, 46341
    hw = side * side
    y = torch.empty(1, R * C, side, side, device="cuda", dtype=torch.bfloat16)
    flat, step = y.view(R * C, hw), 1 << 26
    channel = torch.arange(R * C, device="cuda", dtype=torch.float64)[:, None]
    for i in range(0, hw, step):
        ramp = torch.arange(i, min(i + step, hw), device="cuda", dtype=torch.float64) * (4 / hw) - 1
        flat[:, i : i + step] = (ramp + channel).to(torch.bfloat16)

    def total(fn):  # sum over H*W of fn(float64 chunk of flat) per channel
        return sum(fn(flat[:, i : i + step].double()).sum(1) for i in range(0, hw, step))

    mean = total(lambda t: t) / hw
    var = total(lambda t: (t - mean[:, None]) ** 2) / hw
    got_mean, got_var = ops.channel_stats(y, backend)
    torch.testing.assert_close(got_mean.double(), mean, rtol=1e-4, atol=0)
    torch.testing.assert_close(got_var.double(), var, rtol=1e-4, atol=0)
    scale = torch.tensor([0.5, 2.0], device="cuda")
    shift = torch.tensor([0.25, -3.0], device="cuda")
    act = lambda t: torch.relu(t * scale.double()[:, None] + shift.double()[:, None])  # noqa: E731
    gap = ops.radix_pool(y, scale, shift, R, backend)
    torch.testing.assert_close(gap.double().flatten(), total(act).sum(0, keepdim=True) / hw, rtol=1e-2, atol=0)
    dgap = torch.full((1, C), 3.0, device="cuda")
    dy, dscale, dshift = torch.ops.splat.radix_pool_backward(dgap, y, scale, shift, R, 1, backend)
    positive = lambda t: (t * scale.double()[:, None] + shift.double()[:, None] > 0).double()  # noqa: E731
    torch.testing.assert_close(dshift.double(), total(positive) * (3 / hw), rtol=1e-4, atol=0)
    torch.testing.assert_close(dscale.double(), total(lambda t: positive(t) * t) * (3 / hw), rtol=1e-4, atol=0)
    tail = flat[:, -4096:].double()
    expected_tail = positive(tail) * scale.double()[:, None] * (3 / hw)
    torch.testing.assert_close(dy.view(R * C, hw)[:, -4096:].double(), expected_tail, rtol=1e-2, atol=0)


def _block(backend):
    ref = SplAtConv2d(64, 32, 3, padding=1, bias=False, radix=2, norm_layer=torch.nn.BatchNorm2d).cuda()
    return ref, splat.FusedSplAtConv2d.from_module(ref, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(backend):
    """Forward and backward captured once, replayed on new input: same result as the reference.
    Eval mode, so replays leave the BN statistics alone and the reference sees the same state."""
    ref, fused = _block(backend)
    ref.eval()
    fused.eval()
    x = torch.randn(8, 64, 14, 14, device="cuda", requires_grad=True)
    replay = cuda_graph_step(fused, x)
    x_new = torch.randn_like(x)
    out = replay(x_new)
    x_ref = x_new.clone().requires_grad_()
    expected = ref(x_ref)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bitwise_deterministic_on_gpu(backend, dtype):
    _, fused = _block(backend)
    fused = fused.to(dtype)
    x = torch.randn(16, 64, 28, 28, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)

    def step():
        fused.zero_grad(set_to_none=True)
        xr = x.detach().requires_grad_()
        out = fused(xr)
        out.backward(torch.ones_like(out))
        return [out, xr.grad] + [p.grad for p in fused.parameters()]

    first, second = step(), step()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
