"""Runtimes: run a model on a batch behind one interface.

Every runtime is a callable ``float (B, C, H, W) tensor -> float32 output tensor`` with
``name``, ``device`` (where inputs should be prepared) and ``precision`` attributes:
``TorchRuntime`` (CPU/CUDA), ``OnnxRuntime`` (exported ONNX, CPU) and ``TensorRTRuntime``
(CUDA, needs the ``tensorrt`` extra); ``"replay"`` (not a choice of ``score``) is the zero-cost
stand-in of the ceiling benchmark (``ReplayRuntime``).
"""

from __future__ import annotations

import importlib.util
import logging

__all__ = ["make_runtime", "RUNTIMES"]

RUNTIMES = ("auto", "torch", "onnxruntime", "tensorrt")
log = logging.getLogger(__name__)


def _available(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def make_runtime(module, device: str = "auto", precision: str = "auto", threads: int | None = None,
                 runtime: str = "auto", in_channels: int = 1, size: int = 224,
                 cuda_graphs: bool = False, compile: bool = False, **tensorrt_options):
    """The runtime for ``module`` on ``device`` ("auto", "cpu", "cuda").

    ``runtime="auto"`` picks the fastest one available (benchmarks/README.md): TensorRT on a
    GPU when it imports, else torch fp16; on CPU torch bf16 where the CPU has fast bf16
    (AVX512-BF16/AMX), else - and whenever fp32 is asked for - onnxruntime (faster than torch
    fp32). If the ONNX export of a model fails, "auto" falls back to torch with a warning.
    """
    from cxrscreen.runtime.torch_runtime import TorchRuntime, cpu_has_fast_bf16, pick_device

    if runtime not in RUNTIMES + ("replay",):
        raise ValueError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    dev = pick_device(device)
    if runtime == "replay":
        from cxrscreen.runtime.replay_runtime import ReplayRuntime

        return ReplayRuntime(module, dev)
    if runtime == "auto":
        if dev.type == "cuda":
            runtime = "tensorrt" if _available("tensorrt") else "torch"
        elif precision == "auto" and cpu_has_fast_bf16():
            runtime = "torch"  # bf16 autocast: fastest on CPUs with AVX512-BF16/AMX
        else:
            runtime = "onnxruntime" if _available("onnxruntime") and precision in ("auto", "fp32") else "torch"
        try:
            return make_runtime(module, device, precision, threads, runtime, in_channels, size,
                                cuda_graphs, compile, **tensorrt_options)
        except Exception as e:  # noqa: BLE001 - auto must always give a working runtime
            if runtime == "torch":
                raise
            log.warning("runtime %s unavailable for %s (%s); using torch", runtime, type(module).__name__, e)
            runtime = "torch"
    if runtime == "onnxruntime":
        from cxrscreen.runtime.onnxruntime_runtime import OnnxRuntime

        if precision not in ("auto", "fp32"):
            raise ValueError("the onnxruntime runtime runs fp32 only")
        return OnnxRuntime(module, in_channels, size, dev, threads)
    if runtime == "tensorrt":
        from cxrscreen.runtime.tensorrt_runtime import TensorRTRuntime

        return TensorRTRuntime(module, in_channels, size, dev, precision, **tensorrt_options)
    return TorchRuntime(module, dev, precision, threads, cuda_graphs, compile)
