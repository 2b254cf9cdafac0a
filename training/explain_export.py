"""Export the explain graph ``explain.onnx``: GradCAM++ inputs computed by ONNX Runtime alone.

Contract (read by ``ggo_cli.onnx.explain_graph``; written next to the paired ``model.onnx``):

- inputs ``image`` float32 ``[N, 1, S, S]`` (preprocessed as for model.onnx) and ``target``
  float32 ``[N, C, S, S]`` with C the model's number of output channels (static in the graph:
  the runtime reads it from the input's shape): one plane per channel, the explanation target.
  To explain class k, plane k holds the binary mask of class k on the model grid and the other
  planes are zero (channel 0 is GGO, channel 1 consolidation in a two-class model);
- outputs, in order: ``logits`` ``[N, C, S, S]``, then per exported layer ``L`` (the order of
  the metadata's ``layers``) ``activations.L`` ``[N, K, h, w]`` and ``gradients.L``
  ``[N, K, h, w]`` = dScore/dA with Score_n = sum over channels c and pixels of
  sigmoid(logits[n, c]) * target[n, c] (the metadata's ``score``: SCORE); samples are
  independent in eval mode, so sample n's gradient depends on sample n only. For a one-channel
  model (C = 1) this is sum(sigmoid(logits[:, 0]) * target), as before issue 20;
- dynamic batch axis ``N``;
- ``metadata_props`` key ``ggo_cli_explain``: JSON with ``model_sha256`` (the ``sha256`` of the
  paired model.onnx's ``ggo_cli`` metadata), ``layers``, ``default_layer``, ``score``,
  ``sha256`` (graph digest as in :func:`ggo_cli.onnx.model_info.graph_sha256`) and ``faithfulness``.

How (STYLE.md section 12): ``torch.onnx.export`` cannot trace ``torch.autograd.grad``, so the
forward and the backward are traced jointly with ``make_fx`` (symbolic shapes, core aten
decompositions); ``aten.convolution_backward`` (input gradient only) is rewritten as the
(transposed) convolution it is, and the resulting ``GraphModule`` is exported with the
TorchScript exporter (opset 17). Before tracing, BatchNorm (eval) becomes an explicit
``x * scale + shift`` and ReLUs are made out-of-place, so the graph holds only ops the exporter
knows. The gradients are checked against float64 PyTorch autograd, once per output channel
with only that channel's target plane set.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import operator
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn

from ggo_cli.errors import InputError, ModelError, OutputError

from .checkpoints import load_checkpoint, model_from_checkpoint

log = logging.getLogger(__name__)

OPSET = 17
EXPLAIN_NAME = "explain.onnx"
METADATA_KEY = "ggo_cli_explain"
SCORE = "sum(sigmoid(logits) * target)"
TRACE_BATCH = 2
"""Symbolic tracing specialises sizes 0 and 1, so the trace uses 2 and the check 1 or 3."""
GRADIENT_TOLERANCE = 1e-4
"""Largest allowed max|ORT - float64 autograd| / max|autograd| per output."""
FP16_CAM_TOLERANCE = 0.02
"""Largest allowed max |CAM(fp16 weights) - CAM(fp32)| of normalised CAMs (in [0, 1])."""

EXPLAIN_LAYERS: dict[str, tuple[str, ...]] = {
    "resnet50-unet": ("encoder.layer3", "decoder.0", "decoder.1", "decoder.2", "decoder.3"),
    "densenet121-unet": (
        "encoder.features.denseblock3",
        "decoder.0",
        "decoder.1",
        "decoder.2",
        "decoder.3",
    ),
    "unet": ("down.3", "dec.0", "dec.1", "dec.2", "dec.3"),
}
"""Candidate layers per architecture: the encoder's last stage and each decoder block."""
FALLBACK_DEFAULT_LAYER = "decoder.2"
"""Default layer when faithfulness cannot be measured (no data); first-choice if present."""


def output_names(layers: Sequence[str]) -> list[str]:
    """The explain graph's output names, in contract order."""
    names = ["logits"]
    for layer in layers:
        names += [f"activations.{layer}", f"gradients.{layer}"]
    return names


class _EvalBatchNorm(nn.Module):
    """BatchNorm in eval mode as ``x * scale + shift`` (what the running statistics mean)."""

    scale: Tensor
    shift: Tensor

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        if bn.running_var is None or bn.running_mean is None:
            raise ModelError("BatchNorm without running statistics cannot be exported")
        weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        scale = weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bias - bn.running_mean * scale
        self.register_buffer("scale", scale.detach().reshape(1, -1, 1, 1).clone())
        self.register_buffer("shift", shift.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, x: Tensor) -> Tensor:
        """Shape: ``(N, C, H, W)`` -> same."""
        out: Tensor = x * self.scale + self.shift
        return out


def prepare_model(model: nn.Module) -> nn.Module:
    """A traceable copy: eval, no parameter gradients, explicit BatchNorm, out-of-place ReLU."""
    prepared = copy.deepcopy(model).float().eval()
    for module in list(prepared.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, _EvalBatchNorm(child))
            elif isinstance(child, nn.ReLU):
                setattr(module, name, nn.ReLU(inplace=False))
    prepared.requires_grad_(False)
    return prepared


def explain_function(
    model: nn.Module, layers: Sequence[str]
) -> Callable[[Tensor, Tensor], tuple[Tensor, ...]]:
    """``fn(image, target) -> (logits, A_1, dS/dA_1, ...)`` by forward hooks and autograd.

    The vector-Jacobian product with ``target`` ``[N, C, S, S]`` as the output gradient of
    sigmoid(logits) (all C channels) is exactly d/dA of sum(sigmoid(logits) * target) summed
    over channels and pixels, without a scalar reduction node.

    Raises:
        InputError: a layer name is not a module of the model.
    """
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise InputError(f"no such layer(s) in the model: {', '.join(missing)}")

    def fn(image: Tensor, target: Tensor) -> tuple[Tensor, ...]:
        captured: dict[str, Tensor] = {}

        def hook(name: str) -> Callable[[nn.Module, Any, Tensor], None]:
            def store(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
                captured[name] = output

            return store

        handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
        try:
            with torch.enable_grad():
                logits = model(image.detach().requires_grad_(True))
                prob = torch.sigmoid(logits)
                activations = [captured[name] for name in layers]
                grads = torch.autograd.grad(prob, activations, grad_outputs=target)
        finally:
            for handle in handles:
                handle.remove()
        outputs: list[Tensor] = [logits.detach()]
        for act, grad in zip(activations, grads, strict=True):
            outputs += [act.detach(), grad.detach()]
        return tuple(outputs)

    return fn


def reference_outputs(
    model: nn.Module, layers: Sequence[str], image: np.ndarray, target: np.ndarray
) -> list[np.ndarray]:
    """The contract's outputs by float64 PyTorch autograd on the unmodified model (eval).

    Args:
        model: the model (not modified).
        layers: layer names.
        image: ``[N, 1, S, S]``.
        target: ``[N, C, S, S]``, C the model's output channels.
    """
    model64 = copy.deepcopy(model).double().eval()
    model64.requires_grad_(False)
    fn = explain_function(model64, layers)
    out = fn(torch.from_numpy(image).double(), torch.from_numpy(target).double())
    return [t.numpy() for t in out]


def _hint(value: Any) -> int:
    """A concrete size from a (symbolic) int."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        if not isinstance(hint, int):
            raise TypeError(f"symbolic size {value} has no integer hint (got {hint!r})")
        return hint
    return int(value)


def rewrite_convolution_backward(gm: fx.GraphModule) -> int:
    """Replace input-gradient ``aten.convolution_backward`` nodes by a (transposed) convolution.

    The input gradient of a convolution is the transposed convolution of the output gradient
    with the same weight (``output_padding`` restores the input size lost to striding), and
    that of a transposed convolution is the plain convolution.

    Returns:
        The number of nodes rewritten.

    Raises:
        ModelError: a weight or bias gradient is requested (parameters must not need grad).
    """
    aten = torch.ops.aten
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.target is not aten.convolution_backward.default:
            continue
        grad_out, inp, weight, _bias, stride, padding, dilation, transposed, _op, groups, mask = (
            node.args
        )
        if mask[1] or mask[2]:
            raise ModelError("the explain trace asks for parameter gradients; freeze the model")
        if transposed:
            out_pad = [0] * len(stride)
        else:
            in_size = [_hint(s) for s in inp.meta["val"].shape[2:]]
            out_size = [_hint(s) for s in grad_out.meta["val"].shape[2:]]
            kernel = [_hint(s) for s in weight.meta["val"].shape[2:]]
            out_pad = [
                i - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
                for i, o, k, s, p, d in zip(
                    in_size, out_size, kernel, stride, padding, dilation, strict=True
                )
            ]
        with graph.inserting_before(node):
            conv = graph.call_function(
                aten.convolution.default,
                (
                    grad_out,
                    weight,
                    None,
                    stride,
                    padding,
                    dilation,
                    not transposed,
                    out_pad,
                    groups,
                ),
            )
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise ModelError(f"unexpected use of convolution_backward: {user.target}")
            if user.args[1] == 0:
                user.replace_all_uses_with(conv)
            elif user.users:
                raise ModelError("a parameter gradient of convolution_backward is used")
            graph.erase_node(user)
        graph.erase_node(node)
        count += 1
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return count


def output_channels(model: nn.Module, size: int) -> int:
    """The model's number of output channels C (one float32 forward pass of one sample)."""
    with torch.no_grad():
        logits = prepare_model(model)(torch.zeros(1, 1, size, size))
    return int(logits.shape[1])


def trace_explain(
    model: nn.Module, layers: Sequence[str], size: int, channels: int
) -> fx.GraphModule:
    """Joint forward + backward trace of :func:`explain_function` on a prepared model copy.

    Args:
        model: the model (not modified).
        layers: layer names.
        size: input side S.
        channels: the model's output channels C (the target's planes).
    """
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    fn = explain_function(prepare_model(model), layers)
    decompositions: Any = core_aten_decompositions()
    image = torch.rand(TRACE_BATCH, 1, size, size)
    target = torch.ones(TRACE_BATCH, channels, size, size)
    # The weights are real tensors closed over by fn: they become graph constants.
    gm = make_fx(
        fn,
        tracing_mode="symbolic",
        decomposition_table=decompositions,
        _allow_non_fake_inputs=True,
    )(image, target)
    rewritten = rewrite_convolution_backward(gm)
    log.debug("explain trace: %d convolution_backward rewritten", rewritten)
    left = [n for n in gm.graph.nodes if "backward" in str(n.target)]
    if left:
        ops = sorted({str(n.target) for n in left})
        raise ModelError(f"backward ops left in the explain trace: {ops}")
    return gm


def export_explain_proto(
    model: nn.Module, layers: Sequence[str], size: int, *, channels: int | None = None
) -> Any:
    """Trace and export the float32 explain graph; returns the checked ``onnx.ModelProto``.

    Args:
        model: the model (not modified).
        layers: layer names.
        size: input side S.
        channels: the model's output channels C (default: measured by a forward pass); the
            graph's ``target`` input is ``[N, C, S, S]`` with C static.

    Raises:
        ModelError: ``channels`` differs from the model's output channels.
    """
    import onnx

    measured = output_channels(model, size)
    if channels is not None and channels != measured:
        raise ModelError(f"the model has {measured} output channels, not {channels}")
    gm = trace_explain(model, layers, size, measured)
    names = output_names(layers)
    image = torch.rand(TRACE_BATCH, 1, size, size)
    target = torch.ones(TRACE_BATCH, measured, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / EXPLAIN_NAME
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                gm,
                (image, target),
                str(path),
                input_names=["image", "target"],
                output_names=names,
                dynamic_axes={name: {0: "N"} for name in ["image", "target", *names]},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    dims = [d.dim_value or d.dim_param for d in proto.graph.input[1].type.tensor_type.shape.dim]
    if dims != ["N", measured, size, size]:
        raise ModelError(f"the explain graph's target is {dims}, not [N, {measured}, S, S]")
    return proto


def run_explain(session: Any, image: np.ndarray, target: np.ndarray) -> list[np.ndarray]:
    """Run an explain session; image ``[N, 1, S, S]``, target ``[N, C, S, S]``."""
    feeds = {
        "image": np.ascontiguousarray(image, np.float32),
        "target": np.ascontiguousarray(target, np.float32),
    }
    return list(session.run(None, feeds))


@dataclass(frozen=True, slots=True)
class ExplainResult:
    """What export_explain wrote and measured.

    Attributes:
        path: the explain graph.
        layers: exported layer names.
        default_layer: the chosen default layer.
        gradient_errors: relative max error per output vs float64 autograd (float32 graph).
        fp16_cam_diff: max |CAM fp16 - CAM fp32| per layer (empty without --fp16-weights).
        faithfulness: the faithfulness record (see :mod:`training.faithfulness`).
        size_bytes: file size.
        sha256: graph digest.
    """

    path: Path
    layers: tuple[str, ...]
    default_layer: str
    gradient_errors: dict[str, float]
    fp16_cam_diff: dict[str, float]
    faithfulness: dict[str, Any]
    size_bytes: int
    sha256: str


def export_explain(
    checkpoint_path: Path,
    model_path: Path,
    out_path: Path,
    *,
    fp16_weights: bool = False,
    data: Path | None = None,
    layers: Sequence[str] | None = None,
    max_slices: int | None = None,
    update_card: bool = True,
) -> ExplainResult:
    """Export ``explain.onnx`` for a checkpoint, paired with its exported ``model.onnx``.

    Args:
        checkpoint_path: the checkpoint model.onnx was exported from.
        model_path: the paired model.onnx (its metadata digest and threshold are used).
        out_path: where to write the explain graph.
        fp16_weights: store weights as float16 (checked: CAMs move by < FP16_CAM_TOLERANCE).
        data: labelled slices for the faithfulness measurement (default: the checkpoint's
            recorded data path); without data the default layer is FALLBACK_DEFAULT_LAYER.
        layers: layers to export (default: EXPLAIN_LAYERS of the architecture).
        max_slices: use at most this many slices for faithfulness (default all).
        update_card: add the ``explain`` entry to model.json and rewrite SHA256SUMS beside it.

    Returns:
        The export result.

    Raises:
        InputError: unreadable checkpoint, model or data; unknown layer.
        ModelError: gradient check or fp16 check failed, or checkpoint and model do not pair.
        OutputError: the files cannot be written.
    """
    import onnx
    import onnxruntime as ort

    from ggo_cli.onnx.model_info import graph_sha256, load_model_info

    from .explain_checks import check_pairing, fp16_cam_diff, gradient_errors
    from .export import cast_initializers_fp16
    from .faithfulness import FAITHFULNESS_TARGET, measure_faithfulness, model_grid_slices
    from .multiclass import class_values

    info = load_model_info(model_path)
    checkpoint = load_checkpoint(checkpoint_path)
    model, config = model_from_checkpoint(checkpoint, "cpu")
    if config.size != info.input_size:
        raise ModelError(
            f"{model_path} takes {info.input_size} px but the checkpoint {config.size}"
        )
    layers = tuple(layers or EXPLAIN_LAYERS.get(config.arch, ()))
    if not layers:
        raise InputError(f"no explain layers known for {config.arch}; pass layers")
    channels = config.out_channels
    proto = export_explain_proto(model, layers, config.size, channels=channels)
    fp32_bytes = proto.SerializeToString()
    errors = gradient_errors(fp32_bytes, model, layers, config.size, channels=channels)
    worst = max(errors.values())
    log.info("explain graph vs float64 autograd: max relative error %.3g", worst)
    if worst > GRADIENT_TOLERANCE:
        raise ModelError(
            f"explain graph differs from autograd by {worst:.3g} (> {GRADIENT_TOLERANCE}): "
            + ", ".join(f"{k} {v:.2g}" for k, v in errors.items())
        )

    data_path = data if data is not None else (Path(config.data) if config.data else None)
    grid = None
    if data_path is not None and data_path.exists():
        labels = class_values(config.classes, config.label) if channels > 1 else None
        grid = model_grid_slices(data_path, config.size, max_slices=max_slices, labels=labels)
    model_session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    check_pairing(fp32_bytes, model_session, grid, config.size, info.threshold)

    fp16_diff: dict[str, float] = {}
    if fp16_weights:
        cast_initializers_fp16(proto, keep_per_channel=True)
        fp16_diff = fp16_cam_diff(
            proto.SerializeToString(), fp32_bytes, layers, grid, config.size, channels=channels
        )
        log.info("float16 vs float32 weights: max |CAM diff| %s", fp16_diff)
        if max(fp16_diff.values()) > FP16_CAM_TOLERANCE:
            raise ModelError(
                f"float16 weights move the CAM by {max(fp16_diff.values()):.3g} "
                f"(> {FP16_CAM_TOLERANCE}); export without --fp16-weights"
            )
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    if grid is not None:
        faith = measure_faithfulness(session, model_session, grid, layers, threshold=info.threshold)
        default_layer = str(faith["best_layer"])
    else:
        log.warning("no data at %s: faithfulness not measured", data_path)
        faith = {"measured": False, "target": FAITHFULNESS_TARGET}
        default_layer = FALLBACK_DEFAULT_LAYER if FALLBACK_DEFAULT_LAYER in layers else layers[-1]

    digest = graph_sha256(proto.graph.SerializeToString(deterministic=True))
    meta = {
        "model_sha256": info.recorded_sha256,
        "layers": list(layers),
        "default_layer": default_layer,
        "score": SCORE,
        "sha256": digest,
        "faithfulness": faith,
        "gradient_check": {
            "reference": (
                "float64 PyTorch autograd, batch 1, seeded random image; one random 0/1 target "
                "per output channel with only that channel's plane set"
            ),
            "max_relative_error": worst,
            "per_output": errors,
        },
        "weights": "float16 initializers cast to float32" if fp16_weights else "float32",
        "fp16_max_abs_cam_diff": fp16_diff,
        "opset": OPSET,
    }
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(tmp))
        os.replace(tmp, out_path)
    except OSError as exc:
        raise OutputError(f"cannot write {out_path}: {exc}") from exc
    check = graph_sha256(onnx.load(str(out_path)).graph.SerializeToString(deterministic=True))
    if check != digest:
        raise ModelError(f"{out_path}: graph digest changed on reload ({check} != {digest})")
    if update_card:
        update_model_folder(out_path.parent, out_path, meta)
    return ExplainResult(
        path=out_path,
        layers=layers,
        default_layer=default_layer,
        gradient_errors=errors,
        fp16_cam_diff=fp16_diff,
        faithfulness=faith,
        size_bytes=out_path.stat().st_size,
        sha256=digest,
    )


def update_model_folder(folder: Path, explain_path: Path, meta: Mapping[str, Any]) -> None:
    """Add the ``explain`` entry to ``model.json`` and list explain.onnx in ``SHA256SUMS``."""
    from ggo_cli.onnx.model_info import file_sha256

    from .export import CARD_NAME, _write_text, write_sums

    card_path = folder / CARD_NAME
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {card_path}: {exc}") from exc
        card["explain"] = {
            "file": explain_path.name,
            "sha256": meta["sha256"],
            "sha256_file": file_sha256(explain_path),
            "model_sha256": meta["model_sha256"],
            "layers": meta["layers"],
            "default_layer": meta["default_layer"],
            "score": meta["score"],
            "method": "GradCAM++ (Chattopadhyay et al. 2018, eq. 19)",
        }
        _write_text(card_path, json.dumps(card, indent=2) + "\n")
    write_sums(folder)
