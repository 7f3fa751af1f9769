"""Reference selective-kernel modules: the widely copied SKConv and timm's SelectiveKernel."""

import torch
import torch.nn.functional as F
from torch import nn


class SKConv(nn.Module):
    def __init__(self, features, WH, M, G, r, stride=1, L=32):
        super().__init__()
        d = max(int(features / r), L)
        self.M, self.features = M, features
        self.convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(features, features, kernel_size=3 + i * 2, stride=stride, padding=1 + i, groups=G),
                nn.BatchNorm2d(features),
                nn.ReLU(inplace=False),
            )
            for i in range(M)
        )
        self.fc = nn.Linear(features, d)
        self.fcs = nn.ModuleList(nn.Linear(d, features) for _ in range(M))

    def forward(self, x):
        feas = torch.stack([conv(x) for conv in self.convs], dim=1)  # (B, M, C, H, W)
        z = self.fc(feas.sum(1).mean((2, 3)))
        attn = torch.stack([fc(z) for fc in self.fcs], dim=1).softmax(dim=1)
        return (feas * attn[:, :, :, None, None]).sum(1)


class ConvBn(nn.Module):
    """timm's ConvNormAct as far as the keys go: conv (no bias), bn, then ReLU; aa is None without
    anti-aliasing, as in timm 1.0."""

    def __init__(self, in_channels, out_channels, dilation, stride, groups):
        super().__init__()
        padding = ((stride - 1) + dilation * 2) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, padding, dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.aa = None

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class SelectiveKernelAttn(nn.Module):
    def __init__(self, channels, num_paths, attn_channels):
        super().__init__()
        self.num_paths = num_paths
        self.fc_reduce = nn.Conv2d(channels, attn_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(attn_channels)
        self.act = nn.ReLU()
        self.fc_select = nn.Conv2d(attn_channels, channels * num_paths, 1, bias=False)

    def forward(self, x):
        x = self.act(self.bn(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True))))
        x = self.fc_select(x)
        B, MC = x.shape[:2]
        return x.view(B, self.num_paths, MC // self.num_paths, 1, 1).softmax(dim=1)


class SelectiveKernel(nn.Module):
    """timm's SelectiveKernel with keep_3x3: 3x3 paths of dilation 1, 2, ..."""

    def __init__(self, in_channels, out_channels=None, stride=1, groups=1, num_paths=2, attn_channels=32,
                 split_input=True):
        super().__init__()
        out_channels = out_channels or in_channels
        self.num_paths, self.in_channels, self.out_channels = num_paths, in_channels, out_channels
        self.split_input = split_input
        path_in = in_channels // num_paths if split_input else in_channels
        groups = min(out_channels, groups)
        self.paths = nn.ModuleList(ConvBn(path_in, out_channels, i + 1, stride, groups) for i in range(num_paths))
        self.attn = SelectiveKernelAttn(out_channels, num_paths, attn_channels)

    def forward(self, x):
        if self.split_input:
            xs = torch.split(x, self.in_channels // self.num_paths, 1)
            paths = [op(xs[i]) for i, op in enumerate(self.paths)]
        else:
            paths = [op(x) for op in self.paths]
        x = torch.stack(paths, dim=1)
        return (x * self.attn(x)).sum(1)
