"""Drop-in fused modules."""

from splat.modules.splat_conv import FusedSplAtConv2d

__all__ = ["FusedSplAtConv2d"]
