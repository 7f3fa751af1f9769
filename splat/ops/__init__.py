"""The functional API: each op registered once as ``torch.ops.splat.<name>`` (and ``<name>_backward``).

Every function takes a ``backend`` ("auto", "torch", "triton", "cuda"); "torch" is the
pure-PyTorch implementation that runs anywhere and is the reference for the kernels.
"""

from splat.ops.attention_sum import attention_sum
from splat.ops.bn_add_relu import bn_add_relu
from splat.ops.channel_stats import channel_stats
from splat.ops.radix_pool import radix_pool
from splat.ops.radix_softmax import radix_softmax
from splat.ops.res2net_chain import res2net_chain
from splat.ops.split_attention import split_attention

__all__ = [
    "attention_sum", "bn_add_relu", "channel_stats", "radix_pool", "radix_softmax", "res2net_chain", "split_attention",
]
