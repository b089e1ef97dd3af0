"""PyTorch runtime: channels_last, inference mode, bf16 autocast on CPU / fp16 on CUDA."""

from __future__ import annotations

import torch


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but CUDA is not available here")
    return torch.device(device)


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX"))  # noqa: SIM
    except Exception:  # noqa: BLE001
        return False


class TorchRuntime:
    """Callable: float (B, C, H, W) on ``device`` -> float32 model output.

    ``precision``: "fp32", "bf16" (autocast), "fp16" (autocast, CUDA) or "auto" (fp16 on
    CUDA, bf16 on CPUs with AVX-512/AMX, else fp32).
    """

    def __init__(self, module: torch.nn.Module, device: torch.device, precision: str = "auto",
                 threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        if precision == "auto":
            precision = "fp16" if device.type == "cuda" else ("bf16" if _cpu_has_fast_bf16() else "fp32")
        self.precision = precision
        self.module = module.eval().to(device).to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if self.precision == "fp32":
            return self.module(x).float()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(self.device.type, dtype=dtype):
            return self.module(x).float()
