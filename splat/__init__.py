"""splat: fused GPU kernels for split-attention (ResNeSt, SKNet) and multi-scale (Res2Net) blocks."""

from splat import ops
from splat.backend import backends
from splat.convert import ConversionReport, convert
from splat.modules import FusedBottle2neck, FusedSelectiveKernel, FusedSKConv, FusedSplAtConv2d

__version__ = "0.1.0"
__all__ = [
    "ConversionReport",
    "FusedBottle2neck",
    "FusedSKConv",
    "FusedSelectiveKernel",
    "FusedSplAtConv2d",
    "backends",
    "convert",
    "ops",
]
