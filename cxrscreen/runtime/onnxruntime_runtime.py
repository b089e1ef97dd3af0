"""onnxruntime runtime: the exported ONNX model on CPU (or CUDA with onnxruntime-gpu), fp32."""

from __future__ import annotations

import numpy as np
import torch


class OnnxRuntime:
    """Callable: float (B, C, H, W) -> float32 output tensor, like ``TorchRuntime``."""

    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, module: torch.nn.Module, in_channels: int, size: int, device: torch.device,
                 threads: int | None = None):
        import onnxruntime as ort

        from cxrscreen.runtime.onnx_export import export_onnx

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("onnxruntime has no CUDA provider here (install onnxruntime-gpu), "
                                   "use --runtime torch or tensorrt on the GPU")
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        # torch does the pre/post-processing in the same process: spinning ORT threads would
        # steal its cores between batches
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = export_onnx(module, in_channels, size)
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        self.device = torch.device("cpu")  # inputs are handed over as host arrays

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(["y"], {"x": arr})[0])
