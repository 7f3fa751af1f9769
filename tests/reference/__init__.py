"""Independent reference modules, written from ../shared/SEMANTICS.md with plain PyTorch ops.

They share no code with splat: the fused modules are checked against them.
"""

from tests.reference.res2net import Bottle2neck, TimmBottle2neck
from tests.reference.sk import SelectiveKernel, SKConv
from tests.reference.splat import SplAtConv2d, SplitAttentionConv2d, SplitAttn

__all__ = ["Bottle2neck", "SKConv", "SelectiveKernel", "SplAtConv2d", "SplitAttentionConv2d", "SplitAttn", "TimmBottle2neck"]
