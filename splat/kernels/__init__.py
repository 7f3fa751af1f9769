"""Triton kernels and their launchers, one module per op. Importing this imports triton."""

from splat.kernels.attention_sum import attention_sum_backward, attention_sum_forward
from splat.kernels.bn_add_relu import bn_add_relu_backward_dy, bn_add_relu_backward_sums, bn_add_relu_forward
from splat.kernels.channel_stats import channel_stats_backward, channel_stats_forward
from splat.kernels.radix_pool import radix_pool_backward, radix_pool_forward
from splat.kernels.radix_softmax import radix_softmax_backward, radix_softmax_forward
from splat.kernels.res2net_chain import res2net_chain_backward, res2net_chain_forward
from splat.kernels.split_attention import split_attention_backward_dy, split_attention_backward_sums

__all__ = [
    "attention_sum_backward",
    "attention_sum_forward",
    "bn_add_relu_backward_dy",
    "bn_add_relu_backward_sums",
    "bn_add_relu_forward",
    "channel_stats_backward",
    "channel_stats_forward",
    "radix_pool_backward",
    "radix_pool_forward",
    "radix_softmax_backward",
    "radix_softmax_forward",
    "res2net_chain_backward",
    "res2net_chain_forward",
    "split_attention_backward_dy",
    "split_attention_backward_sums",
]
