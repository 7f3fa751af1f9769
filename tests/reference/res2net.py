"""Reference Res2Net bottlenecks: the original Bottle2neck, timm's (cardinality, dilation) and
OpenMMLab's (mmdet, mmseg)."""

import math

import torch
from torch import nn


class Bottle2neck(nn.Module):
    """The original Res2Net block: split, chain of 3x3 convs ('normal') or independent ('stage')."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, baseWidth=26, scale=4, stype="normal"):
        super().__init__()
        width = int(math.floor(planes * (baseWidth / 64.0)))
        self.conv1 = nn.Conv2d(inplanes, width * scale, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.nums = 1 if scale == 1 else scale - 1
        if stype == "stage":
            self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1)
        self.convs = nn.ModuleList(
            [nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False) for _ in range(self.nums)]
        )
        self.bns = nn.ModuleList([nn.BatchNorm2d(width) for _ in range(self.nums)])
        self.conv3 = nn.Conv2d(width * scale, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stype = stype
        self.scale = scale
        self.width = width

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        for i in range(self.nums):
            sp = spx[i] if i == 0 or self.stype == "stage" else sp + spx[i]
            sp = self.relu(self.bns[i](self.convs[i](sp)))
            out = sp if i == 0 else torch.cat((out, sp), 1)
        if self.scale != 1 and self.stype == "normal":
            out = torch.cat((out, spx[self.nums]), 1)
        elif self.scale != 1 and self.stype == "stage":
            out = torch.cat((out, self.pool(spx[self.nums])), 1)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)


class TimmBottle2neck(nn.Module):
    """timm's Bottle2neck: 'stage' iff stride > 1 or a downsample; grouped, dilated 3x3 branch convs;
    DropBlock on the concatenated branches, stochastic depth (drop_path) before the residual add."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=1, base_width=26, scale=4,
                 dilation=1, first_dilation=None, act_layer=nn.ReLU, norm_layer=None, attn_layer=None,
                 drop_block=None, drop_path=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.scale = scale
        self.is_first = stride > 1 or downsample is not None
        self.num_scales = max(1, scale - 1)
        width = int(math.floor(planes * (base_width / 64.0))) * cardinality
        self.width = width
        first_dilation = first_dilation or dilation
        self.conv1 = nn.Conv2d(inplanes, width * scale, kernel_size=1, bias=False)
        self.bn1 = norm_layer(width * scale)
        self.convs = nn.ModuleList([
            nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=first_dilation, dilation=first_dilation,
                      groups=cardinality, bias=False)
            for _ in range(self.num_scales)
        ])
        self.bns = nn.ModuleList([norm_layer(width) for _ in range(self.num_scales)])
        self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1) if self.is_first else None
        self.conv3 = nn.Conv2d(width * scale, planes * self.expansion, kernel_size=1, bias=False)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.bn3 = norm_layer(planes * self.expansion)
        self.se = attn_layer(planes * self.expansion) if attn_layer is not None else None
        self.relu = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def forward(self, x):
        shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        spo = []
        sp = spx[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = spx[i] if i == 0 or self.is_first else sp + spx[i]
            sp = self.relu(bn(conv(sp)))
            spo.append(sp)
        if self.scale > 1:
            spo.append(self.pool(spx[-1]) if self.pool is not None else spx[-1])
        out = self.bn3(self.conv3(self.drop_block(torch.cat(spo, 1))))
        if self.se is not None:
            out = self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        if self.downsample is not None:
            shortcut = self.downsample(x)
        out += shortcut
        return self.relu(out)


class MMBottle2neck(nn.Module):
    """OpenMMLab's Bottle2neck: ``scales``, ``stage_type``, norms added under ``norm1_name`` /
    ``norm3_name``, the branch convs strided and dilated. A 'stage' block pools the last split only
    when strided: at stride 1 it passes through as in a 'normal' block."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, scales=4, base_width=26,
                 stage_type="normal"):
        super().__init__()
        width = int(math.floor(planes * (base_width / 64)))
        self.scales, self.width, self.stage_type, self.conv2_stride = scales, width, stage_type, stride
        self.with_plugins = False
        self.norm1_name, self.norm3_name = "bn1", "bn3"
        self.conv1 = nn.Conv2d(inplanes, width * scales, 1, bias=False)
        self.add_module(self.norm1_name, nn.BatchNorm2d(width * scales))
        if stage_type == "stage" and stride != 1:
            self.pool = nn.AvgPool2d(kernel_size=3, stride=stride, padding=1)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
            for _ in range(scales - 1)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scales - 1))
        self.conv3 = nn.Conv2d(width * scales, planes * self.expansion, 1, bias=False)
        self.add_module(self.norm3_name, nn.BatchNorm2d(planes * self.expansion))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(getattr(self, self.norm1_name)(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        pieces = []
        for i in range(self.scales - 1):
            sp = spx[i] if i == 0 or self.stage_type == "stage" else sp + spx[i]
            sp = self.relu(self.bns[i](self.convs[i](sp)))
            pieces.append(sp)
        last = spx[self.scales - 1]
        pieces.append(self.pool(last) if self.stage_type == "stage" and self.conv2_stride != 1 else last)
        out = getattr(self, self.norm3_name)(self.conv3(torch.cat(pieces, 1)))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)
