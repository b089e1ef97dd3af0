"""Runtimes: run a model on a batch behind one interface (torch now; TensorRT on GPU)."""

from cxrscreen.runtime.torch_runtime import TorchRuntime, pick_device

__all__ = ["TorchRuntime", "pick_device", "make_runtime"]


def make_runtime(module, device: str = "auto", precision: str = "auto", threads: int | None = None):
    """The runtime for ``module`` on ``device`` ("auto", "cpu", "cuda")."""
    return TorchRuntime(module, pick_device(device), precision, threads)
