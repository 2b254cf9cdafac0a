"""GPU model throughput: ONNX Runtime CUDA (fp32 / fp16, NCHW / NHWC) against PyTorch, one run.

Issue 7 part 3. For the shipped ResNet-50U-Net at 512 x 512, on one GPU and in one process:

- ORT CUDA, IO binding with device-resident fixed-shape input and output (what the card can
  do), for the shipped model (fp16 weights, fp32 compute) and the fp16 variant ggo-cli makes
  (``ggo_cli.onnx.precision.fp16_model_bytes``: fp32 inputs and outputs), each with and without
  the CUDA provider's ``prefer_nhwc``;
- the same with numpy input and output (host copies included);
- PyTorch eager baseline on the same card: ``training.models`` ResNet-50U-Net (random weights:
  speed does not depend on their values), fp16 autocast + channels_last, and fp32;
- agreement: fp16 variant against the shipped model (mask Dice, max |logit diff|);
- the GradCAM++ explain subgraph (``decoder.2``) on CUDA with TF32 off: slices/s and its CAM
  against the CPU's.

Medians of ``--repeats`` timed runs after two warm-up runs. Usage (docs/benchmarks.md)::

    python benchmarks/gpu_throughput.py --model model.onnx --explain explain.onnx --out r.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_rate(
    fn: Callable[[], object], n_items: int, repeats: int, sync: Callable[[], None]
) -> float:
    """Items per second: median over ``repeats`` timed calls after two warm-up calls."""
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return n_items / statistics.median(times)


def synthetic_batch(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Chest-like slices already in the model's [0, 1] lung window."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size), np.float32)
    img[((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1] = 0.8
    for cx in (0.33, 0.67):
        img[((xx - cx) / 0.13) ** 2 + ((yy - 0.5) / 0.22) ** 2 < 1] = 0.15
    img[((xx - 0.3) / 0.05) ** 2 + ((yy - 0.45) / 0.06) ** 2 < 1] = 0.4
    out = np.repeat(img[None, None], n, axis=0)
    out += rng.normal(0, 0.01, size=out.shape).astype(np.float32)
    return np.clip(out, 0, 1).astype(np.float32)


OPTIMIZED_GRAPH = Path("/tmp/ggo_optimized.onnx")


def optimized_op_counts() -> dict[str, int]:
    """Op types (with their domain) of the last session's optimized graph, most common first."""
    import collections

    import onnx

    model = onnx.load(str(OPTIMIZED_GRAPH), load_external_data=False)
    counts = collections.Counter(
        f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        for node in model.graph.node
    )
    return dict(counts.most_common())


def ort_session(
    source: str | bytes,
    *,
    nhwc: bool,
    tf32: bool = True,
    cuda_graph: bool = False,
    graph_ops: bool = False,
) -> Any:
    import onnxruntime as ort

    options = {"device_id": 0, "cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": int(tf32)}
    if nhwc:
        options["prefer_nhwc"] = 1
    if cuda_graph:
        options["enable_cuda_graph"] = 1
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if graph_ops:
        so.optimized_model_filepath = str(OPTIMIZED_GRAPH)
    return ort.InferenceSession(
        source, sess_options=so, providers=[("CUDAExecutionProvider", options)]
    )


def bench_ort(
    session: Any, batch: np.ndarray, repeats: int, channels: int, *, numpy_io: bool = True
) -> dict[str, float]:
    """Slices/s with device-resident IO binding and with numpy in/out."""
    import onnxruntime as ort

    n, _, s, _ = batch.shape
    x = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
    y = ort.OrtValue.ortvalue_from_shape_and_type((n, channels, s, s), np.float32, "cuda", 0)
    binding = session.io_binding()
    binding.bind_ortvalue_input("image", x)
    binding.bind_ortvalue_output("logits", y)
    reps = max(1, 256 // n)

    def bound() -> None:
        for _ in range(reps):
            session.run_with_iobinding(binding)

    def host() -> None:
        for _ in range(max(1, reps // 2)):
            session.run(["logits"], {"image": batch})

    sync = binding.synchronize_outputs
    rates = {"iobinding_slices_per_s": round(median_rate(bound, n * reps, repeats, sync), 1)}
    if numpy_io:
        rates["numpy_slices_per_s"] = round(
            median_rate(host, n * max(1, reps // 2), repeats, lambda: None), 1
        )
    return rates


def bench_torch(batch_sizes: list[int], size: int, repeats: int) -> list[dict[str, Any]]:
    import torch

    from training.models import build_model

    torch.backends.cudnn.benchmark = True
    model = build_model("resnet50-unet").cuda().eval()
    rows = []
    for mode in ("fp16_autocast_channels_last", "fp32_tf32_off"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        net = model.to(memory_format=torch.channels_last) if "channels_last" in mode else model
        for n in batch_sizes:
            x = torch.rand(n, 1, size, size, device="cuda")
            if "channels_last" in mode:
                x = x.to(memory_format=torch.channels_last)
            reps = max(1, 256 // n)

            def run(x: Any = x, reps: int = reps, net: Any = net, mode: str = mode) -> None:
                with torch.inference_mode():
                    for _ in range(reps):
                        if mode.startswith("fp16"):
                            with torch.autocast("cuda", dtype=torch.float16):
                                net(x)
                        else:
                            net(x)

            rate = median_rate(run, n * reps, repeats, torch.cuda.synchronize)
            rows.append(
                {"path": f"pytorch_{mode}", "batch_size": n, "slices_per_s": round(rate, 1)}
            )
            print(json.dumps(rows[-1]), flush=True)
        model = model.to(memory_format=torch.contiguous_format)
    return rows


def bench_explain(explain_path: Path, model_path: Path, repeats: int) -> dict[str, Any]:
    import onnxruntime as ort

    from ggo_cli.analysis.gradcam_maths import cam_to_source, gradcam_plus_plus, normalise_per_slice
    from ggo_cli.onnx.explain_graph import layer_subgraph

    sub = layer_subgraph(explain_path, "decoder.2")
    cuda = ort_session(sub, nhwc=False, tf32=False)
    cpu = ort.InferenceSession(sub, providers=["CPUExecutionProvider"])
    out = ["activations.decoder.2", "gradients.decoder.2"]
    result: dict[str, Any] = {"layer": "decoder.2", "tf32": False}
    for n in (4, 16):
        image = synthetic_batch(n, 512, seed=1)
        target = (image > 0.3).astype(np.float32) * (image < 0.5)

        def run(image: np.ndarray = image, target: np.ndarray = target) -> None:
            a, g = cuda.run(out, {"image": image, "target": target})
            gradcam_plus_plus(a, g)

        result[f"batch{n}_slices_per_s"] = round(median_rate(run, n, repeats, lambda: None), 1)
    image = synthetic_batch(2, 512, seed=2)
    target = (image > 0.3).astype(np.float32) * (image < 0.5)
    cams = []
    for session in (cuda, cpu):
        a, g = session.run(out, {"image": image, "target": target})
        cam = cam_to_source(gradcam_plus_plus(a, g), size=512, rows=512, cols=512)
        cams.append(normalise_per_slice(cam))
    result["cuda_vs_cpu_max_abs_cam_diff"] = float(np.abs(cams[0] - cams[1]).max())
    del model_path
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--explain", type=Path)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="also fp16 + NHWC with CUDA graphs (one per batch)",
    )
    parser.add_argument(
        "--eval", type=Path, help="npz with images [n,512,512] in [0,1] and GGO masks: pooled Dice"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["fp32", "fp16"],
        choices=["fp32", "fp16", "fp16-d2s"],
        help="fp16-d2s: fp16 with the 2 x 2 transposed convolutions as 1 x 1 Conv + DepthToSpace",
    )
    parser.add_argument("--layouts", nargs="+", default=["nchw", "nhwc"], choices=["nchw", "nhwc"])
    parser.add_argument(
        "--graph-ops",
        action="store_true",
        help="count the op types of each session's optimized graph (layout transposes)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    report: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "host": {"platform": platform.platform(), "python": platform.python_version()},
        "ort": [],
    }
    try:
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
        report["torch"] = torch.__version__
    except Exception as exc:  # noqa: BLE001 - report, do not fail
        report["gpu"] = f"unknown ({exc})"
    size = 512
    from ggo_cli.onnx.model_info import file_sha256
    from ggo_cli.onnx.precision import fp16_model_bytes

    digest = file_sha256(args.model)
    half = fp16_model_bytes(args.model, digest)  # exactly what ggo-cli runs
    variants: dict[str, str | bytes] = {}
    for name in args.variants:
        if name == "fp32":
            variants[name] = str(args.model)
        elif name == "fp16":
            variants[name] = half
        else:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            from ggo_cli.onnx.precision import fp32_model, upsampling_as_depth_to_space

            full = fp32_model(args.model)
            upsampling_as_depth_to_space(full)
            variants[name] = convert_float_to_float16(
                full, keep_io_types=True, disable_shape_infer=True
            ).SerializeToString()
    logits: dict[str, np.ndarray] = {}
    check = synthetic_batch(8, size, seed=3)
    evaluation: dict[str, Any] = {}
    if args.eval is not None:
        with np.load(args.eval) as npz:
            eval_images = npz["images"].astype(np.float32)[:, None]
            eval_masks = npz["masks"].astype(bool)

        def pooled_dice(logits: np.ndarray) -> float:
            pred = logits[:, 0] > 0  # sigmoid > 0.5
            inter = np.logical_and(pred, eval_masks).sum()
            return float(2 * inter / max(1, pred.sum() + eval_masks.sum()))

        import onnxruntime as ort_cpu

        cpu = ort_cpu.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
        cpu_logits = cpu.run(["logits"], {"image": eval_images})[0]
        evaluation["cpu_fp32"] = {"pooled_dice": pooled_dice(cpu_logits)}
    for name, source in variants.items():
        for nhwc in [layout == "nhwc" for layout in args.layouts]:
            try:
                session = ort_session(source, nhwc=nhwc, graph_ops=args.graph_ops)
                if args.graph_ops:
                    report.setdefault("graph_ops", {})[
                        f"{name}_{'nhwc' if nhwc else 'nchw'}"
                    ] = optimized_op_counts()
            except Exception as exc:  # noqa: BLE001 - e.g. prefer_nhwc unsupported
                report["ort"].append({"variant": name, "nhwc": nhwc, "error": str(exc)[:300]})
                continue
            channels = session.get_outputs()[0].shape[1]
            channels = channels if isinstance(channels, int) else 1
            for n in args.batch_sizes:
                row: dict[str, Any] = {"variant": name, "nhwc": nhwc, "batch_size": n}
                try:
                    row.update(bench_ort(session, synthetic_batch(n, size), args.repeats, channels))
                except Exception as exc:  # noqa: BLE001
                    row["error"] = str(exc)[:300]
                print(json.dumps(row), flush=True)
                report["ort"].append(row)
            key = f"{name}_{'nhwc' if nhwc else 'nchw'}"
            logits[key] = session.run(["logits"], {"image": check})[0]
            if args.eval is not None:
                got = session.run(["logits"], {"image": eval_images})[0]
                pred, ref = got[:, 0] > 0, cpu_logits[:, 0] > 0
                evaluation[key] = {
                    "pooled_dice": pooled_dice(got),
                    "mask_agreement_vs_cpu_fp32": float((pred == ref).mean()),
                    "max_abs_logit_diff_vs_cpu_fp32": float(np.abs(got - cpu_logits).max()),
                }
                print(json.dumps({key: evaluation[key]}), flush=True)
            del session
    # against the float32 graph when it ran, else against the first session
    ref = logits["fp32_nchw"] if "fp32_nchw" in logits else next(iter(logits.values()), None)
    agreement = {}
    if ref is not None:
        ref_mask = ref[:, 0] > 0
        for key, value in logits.items():
            mask = value[:, 0] > 0
            inter = np.logical_and(mask, ref_mask).sum()
            agreement[key] = {
                "max_abs_logit_diff": float(np.abs(value - ref).max()),
                "mask_dice_vs_fp32": float(2 * inter / max(1, mask.sum() + ref_mask.sum())),
            }
    if args.cuda_graph:
        for n in args.batch_sizes:  # a captured graph is bound to one shape: a session per batch
            row = {"variant": "fp16", "nhwc": True, "cuda_graph": True, "batch_size": n}
            try:
                session = ort_session(half, nhwc=True, cuda_graph=True)
                row.update(
                    bench_ort(session, synthetic_batch(n, size), args.repeats, 1, numpy_io=False)
                )
                del session
            except Exception as exc:  # noqa: BLE001 - e.g. a node not on the CUDA EP
                row["error"] = str(exc)[:300]
            print(json.dumps(row), flush=True)
            report["ort"].append(row)
    report["agreement"] = agreement
    report["evaluation_test10"] = evaluation
    if not args.no_torch:
        try:
            report["torch_rows"] = bench_torch(args.batch_sizes, size, args.repeats)
        except Exception as exc:  # noqa: BLE001
            report["torch_error"] = str(exc)[:300]
    if args.explain is not None:
        try:
            report["explain"] = bench_explain(args.explain, args.model, args.repeats)
        except Exception as exc:  # noqa: BLE001
            report["explain_error"] = str(exc)[:300]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
