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


def backend_params(backends=None):
    return [pytest.param(b, id=b) for b in (backends or BACKENDS)]


def rand(*shape, dtype=torch.float64, layout=torch.contiguous_format, requires_grad=False, scale=1.0):
    t = torch.randn(*shape, dtype=dtype, device=DEVICE) * scale
    if len(shape) == 4:
        t = t.contiguous(memory_format=layout)
    return t.requires_grad_(requires_grad)


def assert_close(actual, expected, dtype, reference_low=None, name=""):
    """``actual`` within the dtype's tolerance of the float64 ``expected``.

    Float16/bfloat16: within 3x the error that the reference itself makes in that dtype
    (``reference_low``), plus a floor of a few ulps, as flash-attention bounds its kernels.
    """
    assert actual is not None, f"{name}: no value"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN (an element was not written?)"
    actual, expected = actual.double(), expected.double()
    if dtype in TOLERANCE:
        torch.testing.assert_close(actual, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype], msg=name)
        return
    ref_err = (reference_low.double() - expected).abs().max().item()
    err = (actual - expected).abs().max().item()
    floor = torch.finfo(dtype).eps * expected.abs().max().item()
    assert err <= 3 * ref_err + floor, f"{name}: error {err:.3g} > 3 x reference error {ref_err:.3g} + {floor:.3g}"
