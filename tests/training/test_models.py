"""The three networks: shapes, parameter counts, the residual decoder, torchvision names."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ggo_cli.errors import InputError
from training.models import (
    ARCHS,
    DenseNet121Encoder,
    DenseResidualDecoderBlock,
    EncoderUNet,
    ResidualDecoderBlock,
    ResNet50Encoder,
    UNet,
    build_model,
    count_parameters,
    load_pretrained_encoder,
)

# Recorded in docs/training.md; a change here is a change of architecture.
PARAMETER_COUNTS = {
    "unet": 31_036_481,
    "resnet50-unet": 20_324_001,
    "densenet121-unet": 16_048_097,
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [64, 96])
def test_output_has_input_resolution(arch: str, size: int) -> None:
    model = build_model(arch).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, size, size))
    assert out.shape == (2, 1, size, size)


def test_resnet50_unet_runs_at_512() -> None:
    model = build_model("resnet50-unet").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 512, 512))
    assert out.shape == (1, 1, 512, 512)


def test_out_channels_are_configurable() -> None:
    with torch.no_grad():
        out = build_model("densenet121-unet", out_channels=3).eval()(torch.rand(1, 1, 64, 64))
    assert out.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_match_the_documented_ones(arch: str) -> None:
    assert count_parameters(build_model(arch)) == PARAMETER_COUNTS[arch]


def test_parameter_counts_are_in_docs() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "training.md"
    text = doc.read_text(encoding="utf-8")
    for count in PARAMETER_COUNTS.values():
        assert f"{count:,}" in text


def test_unknown_architecture_lists_the_valid_names() -> None:
    with pytest.raises(InputError, match="unet, resnet50-unet, densenet121-unet"):
        build_model("vgg16-unet")


def test_more_than_one_input_channel_is_refused() -> None:
    with pytest.raises(InputError, match="in_channels must be 1"):
        build_model("unet", in_channels=3)


def test_encoder_features_follow_the_paper() -> None:
    x = torch.rand(1, 1, 64, 64)
    for encoder in (ResNet50Encoder(), DenseNet121Encoder()):
        with torch.no_grad():
            feats = encoder.eval()(x)
        assert [f.shape[1] for f in feats] == [64, 256, 512, 1024]
        assert [f.shape[-1] for f in feats] == [32, 16, 8, 4]


def _zero_decoder_convs(model: torch.nn.Module) -> None:
    """Zero both 3x3 convolutions of every decoder block (eval-mode BN then gives 0)."""
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, ResidualDecoderBlock):
                for cbr in (block.conv1, block.conv2):
                    cbr[0].weight.zero_()


@pytest.mark.parametrize("arch", ["resnet50-unet", "densenet121-unet"])
def test_decoder_residual_carries_the_signal_when_the_convs_are_dead(arch: str) -> None:
    model = build_model(arch).eval()
    _zero_decoder_convs(model)
    a, b = torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        diff = (model(a) - model(b)).abs().max()
    # Only the residual path (upsampled input, 1x1 projection) is left to carry information.
    assert diff > 1e-4


def test_plain_unet_decoder_has_no_such_path() -> None:
    model = UNet().eval()
    with torch.no_grad():
        for dec in model.dec:
            for cbr in dec:
                cbr[0].weight.zero_()  # BN (eval, fresh) then maps 0 to 0
        a, b = torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64)
        assert torch.equal(model(a), model(b))


def test_residual_block_output_is_convs_plus_projected_upsample() -> None:
    block = ResidualDecoderBlock(32, 8, 16, up_channels=24).eval()  # 24 != 16: projection
    assert not isinstance(block.residual, torch.nn.Identity)
    seen: dict[str, torch.Tensor] = {}
    block.up.register_forward_hook(lambda m, i, o: seen.__setitem__("up", o))
    block.conv2.register_forward_hook(lambda m, i, o: seen.__setitem__("convs", o))
    x, skip = torch.rand(1, 32, 4, 4), torch.rand(1, 8, 8, 8)
    with torch.no_grad():
        out = block(x, skip)
        expected = seen["convs"] + block.residual(seen["up"])
    torch.testing.assert_close(out, expected)


def test_dense_block_sums_everything_before_it() -> None:
    block = DenseResidualDecoderBlock(32, 8, 16, up_channels=16).eval()
    seen: dict[str, torch.Tensor] = {}
    block.up.register_forward_hook(lambda m, i, o: seen.__setitem__("up", o))
    block.conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("f1", o))
    block.conv2.register_forward_hook(lambda m, i, o: seen.__setitem__("f2", o))
    with torch.no_grad():
        out = block(torch.rand(1, 32, 4, 4), torch.rand(1, 8, 8, 8))
    torch.testing.assert_close(out, seen["up"] + seen["f1"] + seen["f2"])


def test_encoders_use_torchvision_parameter_names() -> None:
    resnet = set(ResNet50Encoder().state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.num_batches_tracked",
        "layer3.5.conv3.weight",
    ):
        assert key in resnet
    # torchvision's resnet50 has 320 state entries; layer4 (60) and fc (2) are not built.
    assert len(resnet) == 320 - 62
    densenet = set(DenseNet121Encoder().state_dict())
    for key in (
        "features.conv0.weight",
        "features.norm0.running_mean",
        "features.denseblock1.denselayer1.norm1.weight",
        "features.denseblock3.denselayer24.conv2.weight",
        "features.transition2.conv.weight",
    ):
        assert key in densenet


def _torchvision_like(encoder: torch.nn.Module, first: str, extra: dict[str, torch.Tensor]) -> dict:
    """A state dict shaped like torchvision's: RGB first conv plus the unused classifier parts."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in encoder.state_dict().items():
        state[key] = torch.randn_like(value) if value.is_floating_point() else value
    state[first] = torch.randn(64, 3, 7, 7)
    state.update(extra)
    return state


def test_pretrained_resnet_state_loads_with_rgb_weights_summed(tmp_path: Path) -> None:
    extra = {
        "layer4.0.conv1.weight": torch.zeros(512, 1024, 1, 1),
        "fc.weight": torch.zeros(1000, 2048),
    }
    state = _torchvision_like(ResNet50Encoder(), "conv1.weight", extra)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    model = build_model("resnet50-unet")
    assert isinstance(model, EncoderUNet)
    load_pretrained_encoder(model, "resnet50-unet", str(path))
    torch.testing.assert_close(
        model.encoder.conv1.weight, state["conv1.weight"].sum(1, keepdim=True)
    )
    torch.testing.assert_close(
        model.encoder.layer3[5].bn3.running_var, state["layer3.5.bn3.running_var"]
    )


def test_pretrained_densenet_accepts_old_norm_dot_1_keys(tmp_path: Path) -> None:
    state = _torchvision_like(
        DenseNet121Encoder(), "features.conv0.weight", {"classifier.bias": torch.zeros(1000)}
    )
    old = {k.replace("denselayer1.norm1.", "denselayer1.norm.1."): v for k, v in state.items()}
    path = tmp_path / "densenet121.pth"
    torch.save(old, path)
    model = build_model("densenet121-unet")
    load_pretrained_encoder(model, "densenet121-unet", str(path))
    got = model.encoder.features.denseblock1.denselayer1.norm1.weight
    torch.testing.assert_close(got, state["features.denseblock1.denselayer1.norm1.weight"])


def test_pretrained_with_foreign_keys_is_refused(tmp_path: Path) -> None:
    state = _torchvision_like(ResNet50Encoder(), "conv1.weight", {"head.weight": torch.zeros(3)})
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(InputError, match="unexpected \\['head.weight'\\]"):
        load_pretrained_encoder(build_model("resnet50-unet"), "resnet50-unet", str(path))


def test_pretrained_unet_is_refused() -> None:
    with pytest.raises(InputError, match="resnet50-unet and densenet121-unet only"):
        load_pretrained_encoder(build_model("unet"), "unet", "x.pth")


def test_real_torchvision_weights_load_when_torchvision_is_installed(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    for arch, tv in (
        ("resnet50-unet", torchvision.models.resnet50()),
        ("densenet121-unet", torchvision.models.densenet121()),
    ):
        path = tmp_path / f"{arch}.pth"
        torch.save(tv.state_dict(), path)
        load_pretrained_encoder(build_model(arch), arch, str(path))
