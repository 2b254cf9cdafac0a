"""Tracing and export of the explain graph: forward and backward of a model as one ONNX graph.

How (STYLE.md section 12): ``torch.onnx.export`` cannot trace ``torch.autograd.grad``, so the
forward and the backward are traced jointly with ``make_fx`` (symbolic shapes, core aten
decompositions); ``aten.convolution_backward`` (input gradient only) is rewritten as the
(transposed) convolution it is, and the resulting ``GraphModule`` is exported with the
TorchScript exporter (opset 17). Before tracing, BatchNorm (eval) becomes an explicit
``x * scale + shift`` and ReLUs are made out-of-place, so the graph holds only ops the exporter
knows. :func:`reference_outputs` gives the same outputs by float64 PyTorch autograd, the
reference of the gradient check. The contract of the graph is in :mod:`training.explain_export`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import operator
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn

from ggo_cli.errors import InputError, ModelError

log = logging.getLogger(__name__)

OPSET = 17
EXPLAIN_NAME = "explain.onnx"
TRACE_BATCH = 2
"""Symbolic tracing specialises sizes 0 and 1, so the trace uses 2 and the check 1 or 3."""


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
