"""Drop-in fused modules."""

from splat.modules.res2net import FusedBottle2neck
from splat.modules.sk_conv import FusedSelectiveKernel, FusedSKConv
from splat.modules.splat_conv import FusedSplAtConv2d

__all__ = ["FusedBottle2neck", "FusedSKConv", "FusedSelectiveKernel", "FusedSplAtConv2d"]
