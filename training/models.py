"""The paper's three networks: U-Net, ResNet-50U-Net and DenseNet-121U-Net.

All take one lung-windowed channel and return logits at the input resolution, for any input
side that is a multiple of 32. The ResNet-50 and DenseNet-121 encoders use torchvision's module
and parameter names (``conv1``, ``layer1.0.downsample.0``,
``features.denseblock1.denselayer1.norm1`` ...), so an ImageNet state dict saved from torchvision
loads with :func:`load_pretrained_encoder` (its 3-channel first convolution summed to one). The
encoders themselves are in :mod:`training.encoders`; the decoders and the factory are here.

Decoders (PAPER.md):

- ResNet-50U-Net: per level, a 2x2 transposed convolution upsamples, the encoder skip is
  concatenated, two (3x3 conv, BN, ReLU) follow, and the upsampled tensor is added back to their
  output (1x1 conv + BN projection where channel counts differ): the paper's residual decoder.
- DenseNet-121U-Net: the same upsampling and skip, with dense residual additions: the second
  conv sees the sum of the upsampled input and the first conv's output, and the block returns the
  sum of all three (upsampled input, first and second conv outputs).
- U-Net: double (3x3 conv, BN, ReLU) blocks with max pooling from S to S/16 (64 to 512
  channels), a 1024-channel bottleneck, transposed-convolution decoder with skip concatenation.
  BatchNorm is not in the original U-Net; it is on by default for stable training from scratch
  (``batch_norm=False`` gives the original form).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ggo_cli.errors import InputError

from .config import ARCHS
from .encoders import Bottleneck, DenseNet121Encoder, ResNet50Encoder

__all__ = [
    "ARCHS",
    "DENSENET_DECODER_CHANNELS",
    "RESNET_DECODER_CHANNELS",
    "UNET_WIDTHS",
    "Bottleneck",
    "ConvBNReLU",
    "DenseNet121Encoder",
    "DenseResidualDecoderBlock",
    "DoubleConv",
    "EncoderUNet",
    "ResNet50Encoder",
    "ResidualDecoderBlock",
    "UNet",
    "adapt_torchvision_state",
    "build_model",
    "count_parameters",
    "load_pretrained_encoder",
]

log = logging.getLogger(__name__)

RESNET_DECODER_CHANNELS = (512, 256, 64, 32)
DENSENET_DECODER_CHANNELS = (512, 256, 64, 32)
UNET_WIDTHS = (64, 128, 256, 512, 1024)

# Parts of the torchvision classifiers that the U-Net encoders do not use (dropped on load).
_RESNET_UNUSED = ("layer4.", "fc.")
_DENSENET_UNUSED = (
    "features.transition3.",
    "features.denseblock4.",
    "features.norm5.",
    "classifier.",
)
# Old torchvision DenseNet checkpoints spell "norm.1" for "norm1" (torchvision remaps the same way).
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions, BN to identity (torchvision's ResNet initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ConvBNReLU(nn.Sequential):
    """3x3 convolution, optional batch norm, ReLU. Shape: ``(N, in, H, W) -> (N, out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, *, batch_norm: bool = True) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm),
            nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity(),
            nn.ReLU(inplace=True),
        )


# ----------------------------------------------------------------------------- decoders


class ResidualDecoderBlock(nn.Module):
    """The paper's ResNet-50U-Net decoder block.

    ``u = ConvTranspose(x)``; ``h = two (3x3 conv, BN, ReLU) of concat(u, skip)``;
    ``out = h + P(u)`` with ``P`` the identity, or a 1x1 conv + BN where channels differ.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, up_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, up_channels, 2, stride=2)
        self.conv1 = ConvBNReLU(up_channels + skip_channels, out_channels)
        self.conv2 = ConvBNReLU(out_channels, out_channels)
        self.residual: nn.Module = (
            nn.Identity()
            if up_channels == out_channels
            else nn.Sequential(
                nn.Conv2d(up_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )
        )

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        """Shape: ``(N, in, H, W)``, skip ``(N, skip, 2H, 2W)`` -> ``(N, out, 2H, 2W)``."""
        up = self.up(x)
        h = up if skip is None else torch.cat([up, skip], 1)
        out: Tensor = self.conv2(self.conv1(h)) + self.residual(up)
        return out


class DenseResidualDecoderBlock(ResidualDecoderBlock):
    """DenseNet-121U-Net decoder block with dense residual additions.

    ``r = P(u)``; ``f1 = CBR(concat(u, skip))``; ``f2 = CBR(r + f1)``; ``out = r + f1 + f2``:
    each conv sees, and the block returns, the sum of everything before it.
    """

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        """Shape: ``(N, in, H, W)``, skip ``(N, skip, 2H, 2W)`` -> ``(N, out, 2H, 2W)``."""
        up = self.up(x)
        h = up if skip is None else torch.cat([up, skip], 1)
        r = self.residual(up)
        f1 = self.conv1(h)
        f2 = self.conv2(r + f1)
        out: Tensor = r + f1 + f2
        return out


class EncoderUNet(nn.Module):
    """A pretrained-style encoder (S/2 ... S/16) with a residual decoder back to S.

    The last decoder level concatenates the input image itself as its skip.
    """

    def __init__(
        self,
        encoder: ResNet50Encoder | DenseNet121Encoder,
        block: type[ResidualDecoderBlock],
        decoder_channels: Sequence[int],
        out_channels: int,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        enc = encoder.out_channels  # (S/2, S/4, S/8, S/16)
        skips = (enc[2], enc[1], enc[0], 1)
        blocks = []
        in_ch = enc[3]
        for skip_ch, out_ch in zip(skips, decoder_channels, strict=True):
            blocks.append(block(in_ch, skip_ch, out_ch, up_channels=max(in_ch // 2, out_ch)))
            in_ch = out_ch
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(in_ch, out_channels, 1)
        _init_weights(self.decoder)
        _init_weights(self.head)

    def forward(self, image: Tensor) -> Tensor:
        """Shape: ``(N, 1, S, S) -> (N, C, S, S)`` logits."""
        f2, f4, f8, f16 = self.encoder(image)
        x = f16
        for blk, skip in zip(self.decoder, (f8, f4, f2, image), strict=True):
            x = blk(x, skip)
        logits: Tensor = self.head(x)
        return logits


class DoubleConv(nn.Sequential):
    """Two (3x3 conv, BN, ReLU). Shape: ``(N, in, H, W) -> (N, out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, *, batch_norm: bool = True) -> None:
        super().__init__(
            ConvBNReLU(in_channels, out_channels, batch_norm=batch_norm),
            ConvBNReLU(out_channels, out_channels, batch_norm=batch_norm),
        )


class UNet(nn.Module):
    """Ronneberger's U-Net as in the paper: 64..512 encoder, 1024 bottleneck at S/16."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        widths: Sequence[int] = UNET_WIDTHS,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.inc = DoubleConv(in_channels, widths[0], batch_norm=batch_norm)
        self.down = nn.ModuleList(
            DoubleConv(widths[i], widths[i + 1], batch_norm=batch_norm)
            for i in range(len(widths) - 1)
        )
        self.pool = nn.MaxPool2d(2)
        rev = list(reversed(widths))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(rev[i], rev[i + 1], 2, stride=2) for i in range(len(rev) - 1)
        )
        self.dec = nn.ModuleList(
            DoubleConv(2 * rev[i + 1], rev[i + 1], batch_norm=batch_norm)
            for i in range(len(rev) - 1)
        )
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        _init_weights(self)

    def forward(self, image: Tensor) -> Tensor:
        """Shape: ``(N, 1, S, S) -> (N, C, S, S)`` logits."""
        x = self.inc(image)
        skips = []
        for down in self.down:
            skips.append(x)
            x = down(self.pool(x))
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), skip], 1))
        logits: Tensor = self.head(x)
        return logits


# ----------------------------------------------------------------------------- factory


def build_model(arch: str, **cfg: Any) -> nn.Module:
    """Build one of the paper's networks by name.

    Args:
        arch: ``unet``, ``resnet50-unet`` or ``densenet121-unet``.
        **cfg: ``out_channels`` (default 1); ``in_channels`` must be 1; ``batch_norm`` (U-Net);
            ``decoder_channels`` (encoder U-Nets). Unknown keys are ignored with a debug log, so
            a whole training config may be passed.

    Returns:
        The model, mapping ``(N, 1, S, S)`` to ``(N, C, S, S)`` logits for S a multiple of 32.

    Raises:
        InputError: unknown architecture (the message lists the valid names) or more than one
            input channel.
    """
    in_channels = int(cfg.pop("in_channels", 1))
    if in_channels != 1:
        raise InputError(f"in_channels must be 1 (one lung-windowed CT channel), got {in_channels}")
    out_channels = int(cfg.pop("out_channels", 1))
    if arch == "unet":
        return UNet(in_channels, out_channels, batch_norm=bool(cfg.pop("batch_norm", True)))
    if arch == "resnet50-unet":
        return EncoderUNet(
            ResNet50Encoder(in_channels),
            ResidualDecoderBlock,
            cfg.pop("decoder_channels", RESNET_DECODER_CHANNELS),
            out_channels,
        )
    if arch == "densenet121-unet":
        return EncoderUNet(
            DenseNet121Encoder(in_channels),
            DenseResidualDecoderBlock,
            cfg.pop("decoder_channels", DENSENET_DECODER_CHANNELS),
            out_channels,
        )
    raise InputError(f"unknown architecture {arch!r}; valid names: {', '.join(ARCHS)}")


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapt_torchvision_state(arch: str, state: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """Turn a torchvision ResNet-50 / DenseNet-121 state dict into our encoder's.

    Drops the parts the encoders do not use (ResNet ``layer4``/``fc``; DenseNet ``transition3``,
    ``denseblock4``, ``norm5``, ``classifier``), renames old DenseNet ``norm.1`` keys, strips a
    ``module.`` prefix, and sums the first convolution's RGB weights into one channel (a grey
    image fed as RGB gives the same response).

    Args:
        arch: ``resnet50-unet`` or ``densenet121-unet``.
        state: the torchvision state dict.

    Returns:
        A state dict for ``model.encoder``.
    """
    unused = _RESNET_UNUSED if arch == "resnet50-unet" else _DENSENET_UNUSED
    first = "conv1.weight" if arch == "resnet50-unet" else "features.conv0.weight"
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(unused):
            continue
        match = _DENSENET_OLD_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        if key == first and value.ndim == 4 and value.shape[1] == 3:
            value = value.sum(dim=1, keepdim=True)
        out[key] = value
    return out


def load_pretrained_encoder(model: nn.Module, arch: str, source: str) -> None:
    """Load ImageNet encoder weights into ``model.encoder`` (strict about every other key).

    Args:
        model: a model from :func:`build_model`.
        arch: its architecture.
        source: path of a torchvision state dict (``torch.save(tv_model.state_dict(), p)``), or
            ``imagenet`` to fetch torchvision's weights (needs torchvision and network).

    Raises:
        InputError: U-Net (no pretrained encoder), unreadable file, missing torchvision/network,
            or keys/shapes that do not match the encoder.
    """
    if arch == "unet" or not isinstance(model, EncoderUNet):
        raise InputError("--pretrained applies to resnet50-unet and densenet121-unet only")
    if source == "imagenet":
        state = _fetch_imagenet_state(arch)
    else:
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as exc:
            raise InputError(
                f"cannot read pretrained weights {source}: {exc}; pass a torchvision state dict "
                "saved with torch.save(model.state_dict(), PATH)"
            ) from exc
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    adapted = adapt_torchvision_state(arch, state)
    expected = model.encoder.state_dict()
    missing = sorted(set(expected) - set(adapted))
    unexpected = sorted(set(adapted) - set(expected))
    shapes = [
        k for k in expected if k in adapted and tuple(adapted[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        raise InputError(
            f"pretrained weights {source} do not fit the {arch} encoder: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {shapes[:5]} "
            f"({len(missing)}/{len(unexpected)}/{len(shapes)} in all); pass torchvision's "
            f"{'resnet50' if arch == 'resnet50-unet' else 'densenet121'} state dict"
        )
    model.encoder.load_state_dict(adapted, strict=True)
    log.info("loaded %d pretrained encoder tensors from %s", len(adapted), source)


def _fetch_imagenet_state(arch: str) -> Mapping[str, Tensor]:
    """Download torchvision's ImageNet weights (online machines with torchvision only)."""
    try:
        import torchvision
    except ImportError as exc:
        raise InputError(
            "--pretrained imagenet needs torchvision; install torch==2.14.1 torchvision==0.29.1, "
            "or save the weights on a machine that has it and pass --pretrained PATH"
        ) from exc
    try:
        if arch == "resnet50-unet":
            tv = torchvision.models.resnet50(weights="IMAGENET1K_V2")
        else:
            tv = torchvision.models.densenet121(weights="IMAGENET1K_V1")
    except Exception as exc:  # download failures come as URLError, OSError, RuntimeError...
        raise InputError(
            f"cannot download ImageNet weights ({exc}); on an offline machine pass --pretrained "
            "PATH to a saved torchvision state dict"
        ) from exc
    return dict(tv.state_dict())
