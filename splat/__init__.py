"""splat: fused GPU kernels for split-attention (ResNeSt, SKNet) and multi-scale (Res2Net) blocks."""

from splat import ops
from splat.backend import backends
from splat.modules import FusedSplAtConv2d

__version__ = "0.1.0"
__all__ = ["FusedSplAtConv2d", "backends", "ops"]
