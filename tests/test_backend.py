"""Backend choice: the report, $SPLAT_BACKEND, and the measured table behind backend="auto"."""

import json
import sys
from pathlib import Path

import pytest
import torch

import splat
from splat import backend as _backend
from tests.helpers import backend_params, rand

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import auto_table  # noqa: E402

DEVICE = "NVIDIA H100 80GB HBM3"


def test_backends_report():
    report = splat.backends()
    assert report["torch"] == (True, "")
    for name, (ok, why) in report.items():
        assert ok or why, f"{name} is unavailable without a reason"


@pytest.mark.parametrize("backend", backend_params())
def test_env_var_overrides_auto(backend, monkeypatch):
    monkeypatch.setenv("SPLAT_BACKEND", backend)
    assert _backend.resolve("auto", rand(1), "radix_pool") == backend
    monkeypatch.setenv("SPLAT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve("auto", rand(1), "radix_pool")


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("SPLAT_BACKEND", raising=False)
    assert _backend.resolve("auto", rand(2, 4, 3, 3), "attention_sum") == "torch"


@pytest.mark.parametrize(
    "shape, layout, expected",
    [
        ((2, 8, 56, 56), torch.contiguous_format, "float32/nchw/hw>1024"),
        ((2, 8, 32, 32), torch.channels_last, "float32/channels_last/hw<=1024"),
        ((2, 8, 14, 14), torch.channels_last, "float32/channels_last/hw<=256"),
        ((2, 8, 7, 7), torch.contiguous_format, "float32/nchw/hw<=64"),
        ((2, 8, 1, 1), torch.contiguous_format, "float32/nchw/hw<=64"),
    ],
)
def test_shape_class(shape, layout, expected):
    t = torch.empty(shape, dtype=torch.float32).contiguous(memory_format=layout)
    assert _backend.shape_class(t) == expected
    assert _backend.shape_class(t.to(torch.bfloat16)) == expected.replace("float32", "bfloat16")
    assert _backend.shape_class(torch.empty(3, 8, dtype=torch.float16)) == "float16"


def _doc(triton_us, cuda_us, res2net_ms=None):
    """A bench_blocks.py result with radix_pool timed on both backends at two stages."""
    ops = []
    for (config, key), t_us, c_us in zip(
        [("resnest50d.s1", "bfloat16/nchw/hw>1024"), ("resnest50d.s4", "bfloat16/nchw/hw<=64")], triton_us, cuda_us
    ):
        for backend, us in (("triton", t_us), ("cuda", c_us)):
            for direction in ("fwd", "bwd"):
                ops.append({"op": "radix_pool", "pass": direction, "config": config, "dtype": "bfloat16",
                            "layout": "nchw", "shape_class": key, "backend": backend, "us": us})
    records = []
    for impl, ms in (res2net_ms or {}).items():
        records.append({"block": "res2net", "config": "res2net50_26w_4s.s2", "dtype": "bfloat16",
                        "layout": "channels_last", "mode": "fwd+bwd", "impl": impl, "ms": ms})
    return {"device": DEVICE, "torch": "2.11", "triton": "3.6.0", "date": "2026-11-23", "gpu_timed": True,
            "ops": ops, "records": records}


def test_auto_table_picks_the_faster_backend_per_class(tmp_path):
    doc = _doc(triton_us=[10.0, 3.0], cuda_us=[12.0, 2.0],
               res2net_ms={"res2net-triton": 2.0, "res2net-cuda": 1.5, "res2net-torch": 0.1, "eager": 9.0})
    result, table = tmp_path / "blocks-h100.json", tmp_path / "auto_backend.json"
    result.write_text(json.dumps(doc))
    table.write_text(json.dumps({"Other GPU": {"choices": {"radix_pool": {"float32": "cuda"}}}}))
    assert auto_table.main([str(result), "--table", str(table)]) == 0
    loaded = _backend._load_auto_table(table)
    assert loaded["Other GPU"] == {"radix_pool": {"float32": "cuda"}}
    assert loaded[DEVICE] == {
        "radix_pool": {"bfloat16/nchw/hw>1024": "triton", "bfloat16/nchw/hw<=64": "cuda"},
        # torch is not a candidate: "auto" picks among the GPU kernels.
        "res2net_chain": {"bfloat16/channels_last/hw<=1024": "cuda"},
    }


def test_auto_table_needs_two_backends():
    doc = _doc(triton_us=[10.0, 3.0], cuda_us=[12.0, 2.0])
    doc["ops"] = [o for o in doc["ops"] if o["backend"] == "triton"]
    assert auto_table.choices(doc) == {}


@pytest.mark.parametrize(
    "entry, cuda_ok, expected",
    [("cuda", True, "cuda"), ("cuda", False, "triton"), ("triton", True, "triton"), (None, True, "triton")],
)
def test_auto_choice_follows_the_table(monkeypatch, entry, cuda_ok, expected):
    key = "bfloat16/channels_last/hw>1024"
    table = {DEVICE: {"attention_sum": {key: entry}}} if entry else {}
    monkeypatch.setattr(_backend, "_AUTO_TABLE", table)
    monkeypatch.setattr(_backend, "_cuda_status", lambda: (cuda_ok, "" if cuda_ok else "not built"))
    monkeypatch.setattr(_backend, "_triton_status", lambda: (True, ""))
    assert _backend.auto_choice("attention_sum", DEVICE, key) == expected
    assert _backend.auto_choice("attention_sum", "Another GPU", key) == "triton"
    assert _backend.auto_choice("radix_pool", DEVICE, key) == "triton"
