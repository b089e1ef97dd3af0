"""PyTorch runtime: channels_last, inference mode, bf16/fp16 autocast, CUDA graphs, torch.compile."""

from __future__ import annotations

import torch


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but CUDA is not available here")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
    except Exception:  # noqa: BLE001
        return False


class TorchRuntime:
    """Callable: float (B, C, H, W) -> float32 model output on ``device``.

    ``precision``: "fp32", "bf16" (autocast), "fp16" (autocast, CUDA) or "auto" (fp16 on
    CUDA, bf16 on CPUs with AVX-512/AMX, else fp32). ``cuda_graphs`` captures one graph per
    batch size seen (CUDA only; replays skip Python and kernel-launch overhead);
    ``compile`` wraps the module in ``torch.compile``.
    """

    name = "torch"

    def __init__(self, module: torch.nn.Module, device: torch.device, precision: str = "auto",
                 threads: int | None = None, cuda_graphs: bool = False, compile: bool = False):
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        if precision == "auto":
            precision = "fp16" if device.type == "cuda" else ("bf16" if cpu_has_fast_bf16() else "fp32")
        self.precision = precision
        self.module = module.eval().to(device).to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.module, dynamic=False) if compile else self.module
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.graphs: dict[tuple, tuple] = {}  # input shape -> (graph, static input, static output)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision == "fp32":
            return self.forward(x).float()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(self.device.type, dtype=dtype):
            return self.forward(x).float()

    def _graph_for(self, x: torch.Tensor) -> tuple:
        key = tuple(x.shape)
        if key not in self.graphs:
            static_x = torch.empty_like(x)
            static_x.copy_(x)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph, as capture requires
                for _ in range(2):
                    self._run(static_x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = self._run(static_x)
            self.graphs[key] = (graph, static_x, static_y)
        return self.graphs[key]

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if not self.cuda_graphs:
            return self._run(x)
        graph, static_x, static_y = self._graph_for(x)
        static_x.copy_(x)
        graph.replay()
        return static_y.clone()
