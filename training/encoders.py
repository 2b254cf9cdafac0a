"""The ResNet-50 and DenseNet-121 encoders of the encoder U-Nets, with torchvision's names.

Both take one lung-windowed channel and return features at S/2, S/4, S/8 and S/16. Module and
parameter names are torchvision's (``conv1``, ``layer1.0.downsample.0``,
``features.denseblock1.denselayer1.norm1`` ...), so an ImageNet state dict saved from torchvision
loads with :func:`training.models.load_pretrained_encoder`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv), same attribute names."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Shape: ``(N, inplanes, H, W) -> (N, 4 * planes, H / stride, W / stride)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        result: Tensor = self.relu(out + identity)
        return result


class ResNet50Encoder(nn.Module):
    """ResNet-50 stem, layer1, layer2, layer3 (torchvision names); layer4 and fc are not built.

    Features: stem 64 ch at S/2, layer1 256 at S/4, layer2 512 at S/8, layer3 1024 at S/16.
    """

    out_channels = (64, 256, 512, 1024)

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 3)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 6, stride=2)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        """torchvision's ``ResNet._make_layer`` for bottlenecks."""
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False
                ),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Shape: ``(N, 1, S, S)`` -> features at S/2, S/4, S/8, S/16."""
        stem = self.relu(self.bn1(self.conv1(x)))
        f4 = self.layer1(self.maxpool(stem))
        f8 = self.layer2(f4)
        f16 = self.layer3(f8)
        return [stem, f4, f8, f16]


# ----------------------------------------------------------------------------- DenseNet-121


class _DenseLayer(nn.Module):
    """torchvision's DenseNet layer (BN-ReLU-1x1 conv-BN-ReLU-3x3 conv), same names."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        """Shape: the concatenation of ``features`` -> ``(N, growth_rate, H, W)``."""
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        new: Tensor = self.conv2(self.relu2(self.norm2(x)))
        return new


class _DenseBlock(nn.ModuleDict):
    """torchvision's dense block: ``denselayer1`` ... each sees all earlier outputs."""

    def __init__(self, num_layers: int, num_input_features: int, growth_rate: int, bn_size: int):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        """Shape: ``(N, in, H, W) -> (N, in + num_layers * growth_rate, H, W)``."""
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """torchvision's transition: BN, ReLU, 1x1 conv, 2x2 average pool."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(num_input_features, num_output_features, 1, bias=False))
        self.add_module("pool", nn.AvgPool2d(2, stride=2))


class DenseNet121Encoder(nn.Module):
    """DenseNet-121 ``features`` up to denseblock3 (torchvision names).

    Features: relu0 64 ch at S/2, denseblock1 256 at S/4, denseblock2 512 at S/8, denseblock3
    1024 at S/16 (the paper's 64, 256, 512, 1024).
    """

    out_channels = (64, 256, 512, 1024)
    _TAPS = ("relu0", "denseblock1", "denseblock2", "denseblock3")

    def __init__(self, in_channels: int = 1, growth_rate: int = 32, bn_size: int = 4) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(64),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(3, stride=2, padding=1),
        )
        channels = 64
        for i, num_layers in enumerate((6, 12, 24), start=1):
            layers[f"denseblock{i}"] = _DenseBlock(num_layers, channels, growth_rate, bn_size)
            channels += num_layers * growth_rate
            if i < 3:
                layers[f"transition{i}"] = _Transition(channels, channels // 2)
                channels //= 2
        self.features = nn.Sequential(layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Shape: ``(N, 1, S, S)`` -> features at S/2, S/4, S/8, S/16."""
        taps = []
        for name, module in self.features.named_children():
            x = module(x)
            if name in self._TAPS:
                taps.append(x)
        return taps
