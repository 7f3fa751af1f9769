"""Drop-in fused modules."""

from splat.modules.sk_conv import FusedSelectiveKernel, FusedSKConv
from splat.modules.splat_conv import FusedSplAtConv2d

__all__ = ["FusedSKConv", "FusedSelectiveKernel", "FusedSplAtConv2d"]
