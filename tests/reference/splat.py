"""Reference split-attention modules: the original ResNeSt SplAtConv2d, timm's SplitAttn and
OpenMMLab's SplitAttentionConv2d."""

import torch
import torch.nn.functional as F
from torch import nn


def radix_softmax(a, radix, cardinality):
    """fc2 output (B, R*C, 1, 1) cardinal-major -> (B, R*C) radix-major weights."""
    batch = a.shape[0]
    if radix == 1:
        return torch.sigmoid(a).reshape(batch, -1)
    return a.view(batch, cardinality, radix, -1).transpose(1, 2).softmax(dim=1).reshape(batch, -1)


def split_attention_tail(y, fc1, bn1, fc2, radix, cardinality):
    """y: the activated conv output (B, R*C, H, W)."""
    batch, rchannel = y.shape[:2]
    splits = torch.split(y, rchannel // radix, dim=1) if radix > 1 else (y,)
    gap = sum(splits)
    gap = F.adaptive_avg_pool2d(gap, 1)
    gap = F.relu(bn1(fc1(gap)))
    attn = radix_softmax(fc2(gap), radix, cardinality).view(batch, -1, 1, 1)
    attns = torch.split(attn, rchannel // radix, dim=1)
    return sum(a * s for a, s in zip(attns, splits)).contiguous()


class RectifiedConv2d(nn.Conv2d):
    """Conv whose output at each pixel is scaled by taps/valid_taps (or 1/valid_taps when averaging)."""

    def __init__(self, *args, average_mode=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.average_mode = average_mode

    def forward(self, x):
        out = super().forward(x)
        kh, kw = self.kernel_size
        ones = torch.ones(1, 1, x.shape[2], x.shape[3], dtype=x.dtype, device=x.device)
        valid = F.conv2d(ones, torch.ones(1, 1, kh, kw, dtype=x.dtype, device=x.device),
                         stride=self.stride, padding=self.padding, dilation=self.dilation)
        return out * ((1.0 if self.average_mode else kh * kw) / valid)


class Conv2d(nn.Conv2d):
    """detectron2's Conv2d: a Conv2d followed by its optional ``norm`` and ``activation``."""

    def __init__(self, *args, norm=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm, self.activation = norm, activation

    def forward(self, x):
        x = super().forward(x)
        x = x if self.norm is None else self.norm(x)
        return x if self.activation is None else self.activation(x)


class SplAtConv2d(nn.Module):
    def __init__(self, in_channels, channels, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                 groups=1, bias=True, radix=2, reduction_factor=4, rectify=False, rectify_avg=False,
                 norm_layer=None, dropblock_prob=0.0):
        super().__init__()
        pad = padding if isinstance(padding, tuple) else (padding, padding)
        self.rectify = rectify and (pad[0] > 0 or pad[1] > 0)
        self.rectify_avg = rectify_avg
        inter = max(in_channels * radix // reduction_factor, 32)
        self.radix, self.cardinality, self.channels = radix, groups, channels
        self.dropblock_prob = dropblock_prob
        conv_cls = RectifiedConv2d if self.rectify else nn.Conv2d
        extra = {"average_mode": rectify_avg} if self.rectify else {}
        self.conv = conv_cls(in_channels, channels * radix, kernel_size, stride, padding, dilation,
                             groups=groups * radix, bias=bias, **extra)
        self.use_bn = norm_layer is not None
        if self.use_bn:
            self.bn0 = norm_layer(channels * radix)
        self.fc1 = nn.Conv2d(channels, inter, 1, groups=groups)
        if self.use_bn:
            self.bn1 = norm_layer(inter)
        self.fc2 = nn.Conv2d(inter, channels * radix, 1, groups=groups)

    def forward(self, x):
        y = self.conv(x)
        if self.use_bn:
            y = self.bn0(y)
        y = F.relu(y)
        bn1 = self.bn1 if self.use_bn else nn.Identity()
        return split_attention_tail(y, self.fc1, bn1, self.fc2, self.radix, self.cardinality)


def make_divisible(v, divisor=8, min_value=None):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class RadixSoftmax(nn.Module):
    def __init__(self, radix, cardinality):
        super().__init__()
        self.radix, self.cardinality = radix, cardinality


class SplitAttn(nn.Module):
    """timm's layout: bn0/bn1 are Identity without a norm, activations are modules act0/act1."""

    def __init__(self, in_channels, out_channels=None, kernel_size=3, stride=1, padding=None, dilation=1,
                 groups=1, bias=False, radix=2, rd_ratio=0.25, rd_channels=None, rd_divisor=8,
                 act_layer=nn.ReLU, norm_layer=None, drop_layer=None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.radix = radix
        mid = out_channels * radix
        attn_chs = (make_divisible(in_channels * radix * rd_ratio, rd_divisor, min_value=32)
                    if rd_channels is None else rd_channels * radix)
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_channels, mid, kernel_size, stride, padding, dilation, groups=groups * radix, bias=bias)
        self.bn0 = norm_layer(mid) if norm_layer else nn.Identity()
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act0 = act_layer(inplace=True)
        self.fc1 = nn.Conv2d(out_channels, attn_chs, 1, groups=groups)
        self.bn1 = norm_layer(attn_chs) if norm_layer else nn.Identity()
        self.act1 = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(attn_chs, mid, 1, groups=groups)
        self.rsoftmax = RadixSoftmax(radix, groups)

    def forward(self, x):
        y = self.act0(self.drop(self.bn0(self.conv(x))))
        B, RC, H, W = y.shape
        if self.radix > 1:
            y5 = y.reshape(B, self.radix, RC // self.radix, H, W)
            gap = y5.sum(1)
        else:
            gap = y
        gap = self.act1(self.bn1(self.fc1(gap.mean((2, 3), keepdim=True))))
        attn = radix_softmax(self.fc2(gap), self.radix, self.rsoftmax.cardinality).view(B, -1, 1, 1)
        if self.radix > 1:
            return (y5 * attn.reshape(B, self.radix, RC // self.radix, 1, 1)).sum(1).contiguous()
        return (y * attn).contiguous()


class SplitAttentionConv2d(nn.Module):
    """OpenMMLab's layout (mmdet, mmseg, mmpretrain): the norms are added under ``norm0_name`` and
    ``norm1_name`` (bn0/bn1 for BatchNorms, gn0/gn1 for GroupNorms, ...), one ``relu`` module,
    ``groups`` is the cardinality, the conv has no bias."""

    def __init__(self, in_channels, channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, radix=2,
                 reduction_factor=4, norm_layer=nn.BatchNorm2d, norm_prefix="bn"):
        super().__init__()
        inter = max(in_channels * radix // reduction_factor, 32)
        self.radix, self.groups, self.channels = radix, groups, channels
        self.conv = nn.Conv2d(in_channels, channels * radix, kernel_size, stride, padding, dilation,
                              groups=groups * radix, bias=False)
        self.norm0_name, self.norm1_name = f"{norm_prefix}0", f"{norm_prefix}1"
        self.add_module(self.norm0_name, norm_layer(channels * radix))
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, inter, 1, groups=groups)
        self.add_module(self.norm1_name, norm_layer(inter))
        self.fc2 = nn.Conv2d(inter, channels * radix, 1, groups=groups)
        self.rsoftmax = RadixSoftmax(radix, groups)

    def forward(self, x):
        y = self.relu(getattr(self, self.norm0_name)(self.conv(x)))
        bn1 = getattr(self, self.norm1_name)
        return split_attention_tail(y, self.fc1, bn1, self.fc2, self.radix, self.groups)
