"""pytest-benchmark cases: one ResNeSt block, forward + backward, per implementation.

resnest50d stage 3 (SplitAttn 256 -> 256, radix 2, BN) at batch 64, 14x14, train mode: the eager
reference of tests/reference and FusedSplAtConv2d on each available backend, float32 NCHW and
bfloat16 autocast channels_last. GPU only (skipped elsewhere by tests/conftest.py). Benchmarks
measure, tests check: each case checks the fused output against the reference once, and makes
no assertion about time. The full stage-by-stage comparison is benchmarks/bench_blocks.py.
"""

import contextlib

import pytest
import torch
from torch import nn

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install pytest-benchmark)")

import splat  # noqa: E402
from splat import _layout  # noqa: E402
from tests.reference.splat import SplitAttn  # noqa: E402

pytestmark = pytest.mark.gpu

BATCH, WIDTH, HW = 64, 256, 14  # resnest50d, stage 3
IMPLS = ["eager", "splat-torch", "splat-triton", "splat-cuda"]
SETTINGS = {
    "float32-nchw": (torch.float32, torch.contiguous_format),
    "bfloat16-channels_last": (torch.bfloat16, torch.channels_last),
}


def _autocast(dtype):
    return torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("impl", IMPLS)
def test_resnest50d_stage3_fwd_bwd(benchmark, monkeypatch, impl, setting):
    monkeypatch.setattr(_layout, "POISON", False)  # time the kernels, not the tests' NaN fill
    dtype, layout = SETTINGS[setting]
    if impl != "eager":
        ok, why = splat.backends()[impl.split("-", 1)[1]]
        if not ok:
            pytest.skip(f"backend unavailable: {why}")
    device = torch.device("cuda")
    ref = SplitAttn(WIDTH, WIDTH, 3, padding=1, radix=2, bias=False, norm_layer=nn.BatchNorm2d)
    ref = ref.to(device).train().to(memory_format=layout)
    module = ref if impl == "eager" else splat.FusedSplAtConv2d.from_module(ref, backend=impl.split("-", 1)[1])
    module = module.to(memory_format=layout)
    x = torch.randn(BATCH, WIDTH, HW, HW, device=device).contiguous(memory_format=layout).requires_grad_()
    grad = torch.randn(BATCH, WIDTH, HW, HW, device=device)
    params = list(module.parameters())

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        with _autocast(dtype):
            out = module(x)
        out.backward(grad.to(out.dtype))
        torch.cuda.synchronize()
        return out

    # Check once, outside the timed region: the fused block computes what the reference computes.
    with _autocast(dtype):
        expected = ref(x).detach()
    out = step().detach()
    assert out.shape == (BATCH, WIDTH, HW, HW)
    assert torch.isfinite(out).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
    else:
        err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
        assert err < 5e-2, f"bfloat16 relative error {err:.3g}"

    benchmark.extra_info.update(impl=impl, dtype=str(dtype), layout=str(layout), batch=BATCH)
    benchmark(step)
