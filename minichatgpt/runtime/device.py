"""Where a process computes: ``runtime.device`` and ``runtime.dtype`` resolved once, then passed down.

Models are built and loaded on the CPU (so initial weights do not depend on the device) and
moved to :attr:`Placement.device`; every tensor a forward pass needs is created there. With
``bfloat16`` the forward passes run under autocast while weights, gradients and Adam state stay
float32. The CPU float32 default changes no byte of any output, and is not recorded
(:meth:`Placement.record`); any other placement is, in checkpoint state and metrics.

Nothing here touches CUDA until :func:`resolve` runs, so importing this module is safe in the warm
worker's server process, which forks children and must never initialise CUDA itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from minichatgpt.params import DEVICE_PATTERN, DTYPE_NAMES, ParamsError

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype = torch.float32

    @property
    def mixed(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """Forward passes in ``dtype`` (a no-op for float32); wrap forwards only, never ``backward``."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def generator(self, seed: int) -> torch.Generator:
        """A seeded generator on the device, for sampling there (CUDA draws differ from CPU draws)."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def record(self) -> dict[str, str]:
        """What checkpoint state and metrics note about the placement: nothing for the CPU float32
        default, whose outputs keep the bytes they had before devices existed."""
        if self.device.type == "cpu" and not self.mixed:
            return {}
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": str(self.device), "device_name": name, "dtype": str(self.dtype).removeprefix("torch.")}

    def metrics(self) -> dict[str, str]:
        """:meth:`record` under the ``runtime/`` metric namespace."""
        return {f"runtime/{k}": v for k, v in self.record().items()}


CPU = Placement(torch.device("cpu"))


class DeviceError(ParamsError):
    """``runtime.device`` / ``runtime.dtype`` name something this machine cannot do."""


def resolve(device: str = "cpu", dtype: str = "float32", environ: Mapping[str, str] | None = None) -> Placement:
    """The placement of this process. Under ``accelerate launch`` (``WORLD_SIZE`` > 1) ``cuda`` and
    ``auto`` mean the GPU of this process's ``LOCAL_RANK``, one GPU per process."""
    environ = os.environ if environ is None else environ
    if not DEVICE_PATTERN.fullmatch(device):
        raise DeviceError(f"runtime.device={device!r}: expected auto, cpu, cuda or cuda:N")
    if dtype not in DTYPES:
        raise DeviceError(f"runtime.dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return Placement(torch.device("cpu"), DTYPES[dtype])
    if not torch.cuda.is_available():
        raise DeviceError(f"runtime.device={device!r}, but torch {torch.__version__} sees no CUDA device here "
                          f"({f'built for CUDA {torch.version.cuda}' if torch.version.cuda else 'a CPU-only build'}); "
                          "use cpu or auto")
    index = int(device.partition(":")[2] or torch.cuda.current_device())
    if int(environ.get("WORLD_SIZE", "1")) > 1:
        if ":" in device:
            raise DeviceError(f"runtime.device={device!r} under accelerate launch: use cuda or auto, which give "
                              "each process the GPU of its LOCAL_RANK")
        index = int(environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"runtime.device: cuda:{index}, but torch sees {count} CUDA device(s)")
    placement = Placement(torch.device("cuda", index), DTYPES[dtype])
    if placement.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"runtime.dtype=bfloat16: {torch.cuda.get_device_name(index)} does not support it")
    torch.cuda.set_device(placement.device)
    deterministic_cuda()
    return placement


def deterministic_cuda() -> None:
    """CUDA kernels that give the same bits on every run of the same GPU (embedding backward, index_add
    and cuBLAS reductions otherwise use atomics); ``CUBLAS_WORKSPACE_CONFIG`` is pinned by the stage
    environment. Only called for CUDA: the switch imports torch's compiler stack (~2 s)."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of a model's (first) parameter; CPU for a model without any."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(tensors: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The tensors of a batch dict moved to ``device`` (others kept as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}
