"""The ``--device`` value as a frozen :class:`DeviceRequest`: one device (``auto``, ``cpu``,
``cuda``, ``cuda:N``), or several GPUs over which the ``--jobs`` workers are spread.

Parsed and checked against the visible GPUs by :func:`ggo_cli.config.parse_device`; this
module's names are re-exported by :mod:`ggo_cli.config` (import them from either).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

ALL_GPUS = "all"
"""``cuda:all``: every GPU this process sees (:func:`ggo_cli.host.visible_gpus`)."""


class DeviceKind(StrEnum):
    """Where ``--device`` asks inference to run."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True, slots=True)
class DeviceRequest:
    """A parsed ``--device`` value.

    One device (``auto``, ``cpu``, ``cuda``, ``cuda:N``), or several GPUs (``cuda:0,2``,
    ``cuda:all``) over which the ``--jobs`` worker processes are spread, each worker's
    sessions on one of them (:attr:`devices`). Any one session runs on one device: a run in
    one process (``--jobs 1``, or a single series to do) uses the first listed GPU only.

    GPU numbers are CUDA ordinals, as ONNX Runtime's ``device_id`` takes them: the GPUs
    ``nvidia-smi`` lists, narrowed and renumbered by ``CUDA_VISIBLE_DEVICES`` when it is set
    (:mod:`ggo_cli.host`).

    Attributes:
        kind: ``auto``, ``cpu`` or ``cuda``.
        ordinal: the CUDA device ordinal as given (``cuda:N``), or ``None``.
        gpus: the GPUs the workers are spread over, in the order given (``cuda:0,2``, or
            ``cuda:all`` as resolved when parsed); empty for one device.
        all_gpus: written as ``cuda:all``.
    """

    kind: DeviceKind = DeviceKind.AUTO
    ordinal: int | None = None
    gpus: tuple[int, ...] = ()
    all_gpus: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", DeviceKind(self.kind))  # "cpu" -> DeviceKind.CPU

    @property
    def index(self) -> int:
        """The CUDA device ordinal of a session: ``cuda:N``'s N, the first GPU of several,
        else 0."""
        if self.gpus:
            return self.gpus[0]
        return self.ordinal or 0

    @property
    def spread(self) -> bool:
        """Whether the request names several GPUs (or ``cuda:all``) for the workers."""
        return self.all_gpus or bool(self.gpus)

    @property
    def devices(self) -> tuple[DeviceRequest, ...]:
        """The one-device requests a run may use: ``cuda:N`` for each listed GPU, in order;
        else this request itself. Which worker takes which:
        :func:`ggo_cli.run.placement.worker_devices`; one process takes the first."""
        if not self.gpus:
            return (self,)
        return tuple(DeviceRequest(DeviceKind.CUDA, n) for n in self.gpus)

    def __str__(self) -> str:
        """The value as written on the command line (lower case): ``cuda``, ``cuda:1``,
        ``cuda:0,2``, ``cuda:all``..."""
        if self.all_gpus:
            return f"{self.kind.value}:{ALL_GPUS}"
        if self.gpus:
            return f"{self.kind.value}:{','.join(map(str, self.gpus))}"
        return self.kind.value if self.ordinal is None else f"{self.kind.value}:{self.ordinal}"
