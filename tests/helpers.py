"""Shared test utilities: devices, backends, dtypes and tolerances."""

import pytest
import torch

import splat

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Backends that can run here: on CPU, "triton" runs through Triton's interpreter.
BACKENDS = [name for name, (ok, _) in splat.backends().items() if ok]

# The interpreter computes bf16/fp16 arithmetic wrongly, so low precision is tested on the GPU only.
DTYPES = [torch.float64, torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE.type == "cuda" else [])

LAYOUTS = [torch.contiguous_format, torch.channels_last]

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}

# Relative floor under the 3x-reference bound: gradients through training-mode BN of the tiny
# MLP are ill-conditioned (the reference itself is off by ~1e-4 in float32 there).
FLOOR = {torch.float32: 1e-4, torch.float16: 4 * torch.finfo(torch.float16).eps,
         torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps}


def backend_params(backends=None):
    return [pytest.param(b, id=b) for b in (backends or BACKENDS)]


def rand(*shape, dtype=torch.float64, layout=torch.contiguous_format, requires_grad=False, scale=1.0):
    t = torch.randn(*shape, dtype=dtype, device=DEVICE) * scale
    if len(shape) == 4:
        t = t.contiguous(memory_format=layout)
    return t.requires_grad_(requires_grad)


def assert_close(actual, expected, dtype, reference_low=None, name=""):
    """``actual`` within tolerance of the float64 ``expected``.

    With ``reference_low`` (the reference computed in ``dtype``), the bound is 3x the error the
    reference itself makes in that dtype plus a small relative floor, as flash-attention bounds its kernels;
    without it (or in float64) the fixed per-dtype tolerance applies.
    """
    assert actual is not None, f"{name}: no value"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN (an element was not written?)"
    actual, expected = actual.double(), expected.double()
    if reference_low is None or dtype == torch.float64:
        tol = TOLERANCE.get(dtype, 1e-2)
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=name)
        return
    ref_err = (reference_low.double() - expected).abs().max().item()
    err = (actual - expected).abs().max().item()
    floor = FLOOR[dtype] * max(expected.abs().max().item(), 1.0)
    assert err <= 3 * ref_err + floor, f"{name}: error {err:.3g} > 3 x reference error {ref_err:.3g} + {floor:.3g}"
