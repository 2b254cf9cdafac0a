"""ONNX Runtime inference: one session per run, batches of slices, CPU or NVIDIA GPU.

onnxruntime-gpu silently falls back to the CPU when CUDA cannot be used, so the providers in
use are read back with ``session.get_providers()`` and logged; an explicit ``--device cuda``
that ends up on the CPU is an error. On CUDA, inputs and outputs are bound to device buffers
of a fixed batch shape (IO binding), and an out-of-memory error halves the batch and retries.
Session creation and batching live in :mod:`ggo_cli.onnx.runtime`; what the segmenter shares
with the explainer (providers, device, batch size, IO binding) in
:mod:`ggo_cli.analysis.onnx_session`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from ..config import DeviceRequest, parse_device
from ..domain import CtVolume, Prediction
from ..errors import InputError, ModelError
from ..onnx.model_info import INPUT_NAME, OUTPUT_NAME, ModelInfo
from ..onnx.precision import CUDA_NHWC_OPTIONS, Precision, fp16_model_bytes
from ..onnx.runtime import (
    CUDA_PROVIDER,
    create_session,
    cuda_wanted,
)
from ..onnx.variant_verdict import VariantCheck
from ..onnx.variants import VariantChoice, choose_fp16, choose_int8
from ..onnx.verdict_cache import VerdictCache
from ..onnx.windowing import (
    HU_INPUT_NAME,
    MASK_OUTPUT_NAME,
    NEAR_OUTPUT_NAME,
    windowed_model_bytes,
)
from .masks import threshold_probabilities
from .onnx_session import OnnxSessionBase, check_batch_size
from .preprocessing import GridMapping, preprocess_hu, sigmoid, to_source_grid
from .quality import NEAR_THRESHOLD_BAND, near_threshold_logit

log = logging.getLogger(__name__)


class OnnxSegmenter(OnnxSessionBase):
    """Runs a contract-checked ONNX model over CT volumes.

    Args:
        model: the validated model description.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: slices per batch; ``None`` picks 16 on CUDA, 1 on the CPU (4 for int8).
        threshold: probability threshold; ``None`` takes the model's.
        precision: ``auto`` (fp16 on CUDA; on the CPU int8 where a validated int8 variant
            ships beside the model, else fp32), ``fp32``, ``fp16`` (CUDA) or ``int8`` (CPU).
        window_in_graph: run int16 series on the model's own grid through a second session
            whose graph windows the HU and thresholds the logits itself
            (:func:`~ggo_cli.onnx.windowing.windowed_model_bytes`); ``None``: on CUDA only, where
            the host's windowing and thresholding showed in the profile.
        force_check: run a variant's self-check against float32 again even when this machine's
            verdict is cached (``--force``).
        verdicts: self-check verdicts shared with other segmenters of this process (each
            key is then measured or read once); ``None``: this segmenter's own.
        intra_op_threads: threads of its CPU sessions, self-checks included (a ``--jobs``
            worker's share, :attr:`ggo_cli.host.HostLimits.intra_op_threads`); ``None``: ONNX
            Runtime's default.

    Raises:
        DeviceError: CUDA requested but not usable.
        InputError: a precision the device cannot run.
        ModelError: the session cannot be created, or a variant asked for explicitly
            (``--precision int8|fp16``) disagrees with float32 on this machine.
    """

    def __init__(
        self,
        model: ModelInfo,
        *,
        device: str | DeviceRequest = "auto",
        batch_size: int | None = None,
        threshold: float | None = None,
        precision: str = "auto",
        window_in_graph: bool | None = None,
        force_check: bool = False,
        verdicts: VerdictCache | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        self.model = model
        self.intra_op_threads = intra_op_threads
        request = parse_device(device)
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise InputError(f"--threshold must be between 0 and 1, got {threshold}")
        self.threshold = model.threshold if threshold is None else threshold
        try:
            self.requested_precision = Precision(precision)
        except ValueError:
            choices = ", ".join(p.value for p in Precision)
            raise InputError(f"invalid --precision {precision!r}; use {choices}") from None
        self.precision = Precision.FP32
        # Whether the variant in use was checked against float32 on this machine (always
        # true of float32 itself); a series run on an unchecked variant is flagged.
        self.variant_checked = True
        self.variant_check: VariantCheck | None = None  # the last self-check's verdict
        self.int8_recipe = ""  # the int8 recipe in use
        self.force_check = force_check
        self.verdicts = VerdictCache() if verdicts is None else verdicts
        self._variant_bytes: bytes | None = None  # the serialized variant, None: the file
        session = self._create_session(request)
        check_batch_size(batch_size)
        # On CUDA, the graphs ("model", "windowed") run through bound device buffers.
        self._use_session(session, request, batch_size, int8=self.precision is Precision.INT8)
        self.window_in_graph = self.on_cuda if window_in_graph is None else window_in_graph
        if not self.window_in_graph:
            self._variant_bytes = None  # only the windowed graph needs them again
        self._request = request
        self._windowed: Any | None = None
        log.info(
            "model %s %s on %s (providers %s), %s, batch %d, threshold %.3g",
            model.name,
            model.version,
            self.device_label,
            ",".join(self.providers),
            self.precision.value,
            self.batch_size,
            self.threshold,
        )

    def _create_session(self, request: DeviceRequest) -> Any:
        """The session of the chosen precision (see :mod:`ggo_cli.onnx.variants`); sets
        ``self.precision`` and the variant's self-check attributes."""
        wanted = self.requested_precision
        on_cuda = cuda_wanted(request)
        if wanted is Precision.FP16 and not on_cuda:
            raise InputError("--precision fp16 runs on CUDA only; use fp32 or int8 on the CPU")
        if wanted is Precision.INT8 and on_cuda:
            raise InputError("--precision int8 runs on the CPU only; add --device cpu")
        if on_cuda:
            fp16 = wanted in (Precision.AUTO, Precision.FP16)
            variant = fp16_model_bytes(self.model.path, self.model.file_sha256) if fp16 else None
            session = create_session(
                self.model.path, request, cuda_options=CUDA_NHWC_OPTIONS, model_bytes=variant,
                intra_op_threads=self.intra_op_threads,
            )
            if session.get_providers()[0] == CUDA_PROVIDER:
                if variant is not None:
                    choice = choose_fp16(
                        self.model, variant, request, explicit=wanted is Precision.FP16,
                        force=self.force_check, verdicts=self.verdicts,
                        intra_op_threads=self.intra_op_threads,
                    )
                    self._take(choice)
                    if choice.data is None:
                        return create_session(
                            self.model.path, request, cuda_options=CUDA_NHWC_OPTIONS,
                            intra_op_threads=self.intra_op_threads,
                        )
                self.precision = Precision.FP16 if fp16 else Precision.FP32
                self._variant_bytes = variant
                return session
            log.debug("CUDA fell back to the CPU: CPU session instead")
        if wanted in (Precision.AUTO, Precision.INT8):
            choice = choose_int8(
                self.model, request, explicit=wanted is Precision.INT8, force=self.force_check,
                verdicts=self.verdicts, intra_op_threads=self.intra_op_threads,
            )
            self._take(choice)
            if choice.data is not None:
                self.precision = Precision.INT8
                self._variant_bytes = choice.data
                return create_session(
                    self.model.path, request, model_bytes=choice.data,
                    intra_op_threads=self.intra_op_threads,
                )
        return create_session(self.model.path, request, intra_op_threads=self.intra_op_threads)

    def _take(self, choice: VariantChoice) -> None:
        """Record a variant choice's self-check."""
        self.variant_check = choice.check
        self.variant_checked = choice.checked
        self.int8_recipe = choice.recipe

    def _run_cpu(
        self, batch: npt.NDArray[np.float32], *, release_arena: bool = False
    ) -> npt.NDArray[np.float32]:
        """Run one batch on the CPU; with ``release_arena``, ONNX Runtime hands its arena's
        free blocks (the activations, 0.2 GB a slice in float32) back after the run, so they
        are not held while the SEG is built (``memory.enable_memory_arena_shrinkage``)."""
        options = None
        if release_arena:
            import onnxruntime as ort  # deferred: keeps `ggo-cli --help` fast

            options = ort.RunOptions()
            options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch}, options)[0]
        return np.asarray(out, dtype=np.float32)

    def _run_cuda(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Run one preprocessed batch on the GPU. Shape: ``(n, 1, S, S)`` -> ``(n, C, S, S)``."""
        out = self._run_bound(
            "model",
            self.session,
            batch,
            INPUT_NAME,
            ((OUTPUT_NAME, self.model.n_channels, np.float32),),
        )
        return np.asarray(out[0], dtype=np.float32)

    def _windowed_session(self, logit_threshold: float) -> Any:
        """The session of the windowed, thresholded graph (created on first use); it also
        returns ``near``, the GGO channel's marginal calls (see ``predict``)."""
        if self._windowed is None:
            base = self._variant_bytes or self.model.path.read_bytes()
            data = windowed_model_bytes(
                base,
                low_hu=self.model.window_center_hu - self.model.window_width_hu / 2.0,
                width_hu=self.model.window_width_hu,
                logit_threshold=logit_threshold,
                input_name=INPUT_NAME,
                output_name=OUTPUT_NAME,
                near_logit_threshold=near_threshold_logit(self.threshold),
            )
            self._windowed = create_session(  # raises ModelError
                self.model.path,
                self._request,
                cuda_options=CUDA_NHWC_OPTIONS if self.on_cuda else None,
                model_bytes=data,
                intra_op_threads=self.intra_op_threads,
            )
            log.debug("windowed graph in use: HU in, masks out")
        return self._windowed

    def _predict_windowed(
        self, hu: npt.NDArray[np.int16], logit_threshold: float
    ) -> tuple[npt.NDArray[np.bool_], int]:
        """Masks of int16 HU slices on the model grid through the windowed graph, and the
        number of the GGO channel's marginal calls (the graph's ``near`` output).

        Shape: ``(n, S, S)`` -> ``(n, C, S, S)``.
        """
        session = self._windowed_session(logit_threshold)
        outputs = (
            (MASK_OUTPUT_NAME, self.model.n_channels, np.bool_),
            (NEAR_OUTPUT_NAME, 1, np.bool_),
        )

        def run(start: int, stop: int) -> tuple[npt.NDArray[np.bool_], int]:
            mask, near = self._run_bound(
                "windowed", session, hu[start:stop, None], HU_INPUT_NAME, outputs
            )
            return mask, int(np.count_nonzero(near))

        results = self._in_batches(run, hu.shape[0])
        masks = [mask for mask, _ in results]
        near = sum(count for _, count in results)
        return (np.concatenate(masks) if len(masks) > 1 else masks[0]), near

    def predict_logits(
        self, batch: npt.NDArray[np.float32], *, last: bool = False
    ) -> npt.NDArray[np.float32]:
        """Run the model on a preprocessed batch, halving the batch on GPU out-of-memory.

        Args:
            batch: model input. Shape: ``(n, 1, S, S)``.
            last: the series' last batch: on the CPU, ONNX Runtime's arena is shrunk after it.

        Returns:
            Logits. Shape: ``(n, C, S, S)``.

        Raises:
            ModelError: inference failed for a reason other than memory, or at batch size 1.
        """

        def run(start: int, stop: int) -> npt.NDArray[np.float32]:
            chunk = batch[start:stop]
            if self.on_cuda:
                return self._run_cuda(chunk)
            return self._run_cpu(chunk, release_arena=last and stop == batch.shape[0])

        results = self._in_batches(run, batch.shape[0])
        return np.concatenate(results) if len(results) > 1 else results[0]

    def predict(
        self,
        volume: CtVolume,
        *,
        on_slices: Callable[[int], None] | None = None,
        out: npt.NDArray[np.bool_] | None = None,
    ) -> Prediction:
        """Segment every slice of a volume.

        Args:
            volume: the CT volume.
            on_slices: optional callback with the number of slices just finished.
            out: bool array (or view) to write the masks into, e.g. part of the SEG's stack.
                Shape: ``(slices, rows, cols, channels)``.

        Returns:
            Masks on the source grid (``out`` when given), with the count of predicted GGO
            voxels and of those below the threshold + 0.1 in probability (the
            ``low_confidence`` quality flag; counted batch by batch, no probability volume
            is kept). Shape: ``(slices, rows, cols, channels)``.

        Raises:
            ValueError: ``out`` has the wrong shape or type (a bug in the caller).
        """
        n, rows, cols = volume.hu.shape
        shape = (n, rows, cols, self.model.n_channels)
        if out is not None and (out.shape != shape or out.dtype != np.bool_):
            raise ValueError(f"out must be bool {shape}, got {out.dtype} {out.shape}")
        masks = np.zeros(shape, dtype=bool) if out is None else out
        # On the model's own grid (512 x 512 CT: no resize back) the mask is decided on the
        # logits, logit > ln(t / (1 - t)): the same decision as sigmoid(logit) > t but for
        # float32 rounding of the sigmoid at the threshold itself, without a sigmoid pass over
        # every pixel (a fifth of predict's time on a GPU).
        size = self.model.input_size
        logit_threshold = None
        if GridMapping(rows, cols, size).is_identity and 0.0 < self.threshold < 1.0:
            logit_threshold = np.float32(math.log(self.threshold / (1.0 - self.threshold)))
        # int16 HU on the model grid, on CUDA: window and threshold inside the graph.
        in_graph = (
            self.window_in_graph and logit_threshold is not None and volume.hu.dtype == np.int16
        )
        # Marginal GGO calls (probability in (t, t + 0.1)), counted per batch for the
        # low_confidence quality flag: on logits below logit(t + 0.1) on the model's grid,
        # else on the source-grid probabilities.
        near_logit = np.float32(near_threshold_logit(self.threshold))
        near_probability = np.float32(self.threshold + NEAR_THRESHOLD_BAND)
        predicted = near = 0
        step = max(self.batch_size, 1)
        for start in range(0, n, step):
            stop = min(start + step, n)
            if in_graph and logit_threshold is not None:
                hu = np.asarray(volume.hu[start:stop], dtype=np.int16)  # int16 already: a view
                try:
                    decided, near_count = self._predict_windowed(hu, float(logit_threshold))
                except ModelError as exc:
                    # Never worse than before: the host path and the plain session take over.
                    log.warning("windowed graph failed (%s); windowing on the host instead", exc)
                    self.window_in_graph = in_graph = False
                    self._windowed = None
                    self._bound.pop("windowed", None)
                else:
                    masks[start:stop] = np.moveaxis(decided, 1, -1)
                    predicted += int(np.count_nonzero(decided[:, 0]))
                    near += near_count
                    if on_slices is not None:
                        on_slices(stop - start)
                    continue
            batch = preprocess_hu(
                volume.hu[start:stop],
                size=self.model.input_size,
                center_hu=self.model.window_center_hu,
                width_hu=self.model.window_width_hu,
            )
            logits = self.predict_logits(batch, last=stop == n)
            if logit_threshold is not None:
                decided = np.greater(logits, logit_threshold)
                below = np.less(logits[:, 0], near_logit)
            else:
                on_grid = to_source_grid(sigmoid(logits), rows, cols)
                decided = threshold_probabilities(on_grid, self.threshold)
                below = np.less(on_grid[:, 0], near_probability)
            masks[start:stop] = np.moveaxis(decided, 1, -1)
            predicted += int(np.count_nonzero(decided[:, 0]))
            near += int(np.count_nonzero(np.logical_and(decided[:, 0], below, out=below)))
            if on_slices is not None:
                on_slices(stop - start)
        return Prediction(
            masks=masks,
            threshold=self.threshold,
            predicted_ggo_voxels=predicted,
            near_threshold_voxels=near,
        )
