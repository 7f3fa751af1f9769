"""Input validation for the public op functions: ValueError/TypeError naming the argument."""

import torch


def floating(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def rank(t: torch.Tensor, n: int, name: str) -> None:
    floating(t, name)
    if t.dim() != n:
        raise ValueError(f"{name} must be {n}-D, got shape {tuple(t.shape)}")


def same_device(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")


def divides(n: int, total: int, name: str, what: str) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    if total % n:
        raise ValueError(f"{name}={n} must divide {what}={total}")


def conv_output(y: torch.Tensor, radix: int, name: str = "y") -> int:
    """Check y (B, R*C, H, W) and return C."""
    rank(y, 4, name)
    divides(radix, y.shape[1], "radix", f"the channel count of {name}")
    return y.shape[1] // radix


def channel_vector(v: torch.Tensor, y: torch.Tensor, name: str) -> None:
    """A per-channel (R*C,) vector of y's accumulation dtype (float64 for float64 y, else float32)."""
    rank(v, 1, name)
    same_device(v, y, name, "y")
    if v.shape[0] != y.shape[1]:
        raise ValueError(f"{name} must have {y.shape[1]} elements (one per channel of y), got {v.shape[0]}")
    expected = torch.float64 if y.dtype == torch.float64 else torch.float32
    if v.dtype != expected:
        raise TypeError(f"{name} must be {expected} for y of dtype {y.dtype}, got {v.dtype}")


def batch_rows(t: torch.Tensor, y: torch.Tensor, channels: int, name: str) -> None:
    """A (B, channels) tensor matching y's batch and device."""
    rank(t, 2, name)
    same_device(t, y, name, "y")
    if tuple(t.shape) != (y.shape[0], channels):
        raise ValueError(f"{name} must have shape {(y.shape[0], channels)}, got {tuple(t.shape)}")


def vector(v: torch.Tensor, y: torch.Tensor, n: int, name: str) -> None:
    """A floating (n,) parameter vector on y's device."""
    rank(v, 1, name)
    same_device(v, y, name, "y")
    if v.shape[0] != n:
        raise ValueError(f"{name} must have {n} elements, got {v.shape[0]}")
