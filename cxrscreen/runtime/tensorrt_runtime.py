"""TensorRT runtime: ONNX -> engine (fp16, optional INT8 calibration), dynamic batch profile,
engines cached on disk by model hash + GPU name + TensorRT version; torch tensors as buffers.

Needs the ``tensorrt`` Python package (``pip install 'cxrscreen[tensorrt]'`` from NVIDIA's index)
and a CUDA GPU.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def import_tensorrt():
    """``tensorrt``, or an ImportError that says how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError("the TensorRT runtime needs the `tensorrt` package: "
                          "pip install 'cxrscreen[tensorrt]' --extra-index-url https://pypi.nvidia.com") from e
    return trt


def _calibrator(trt, batches: list[np.ndarray], cache: Path):
    """An entropy calibrator feeding ``batches`` (float32 (B, C, H, W)) to the INT8 builder."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.batches = [b for b in batches if len(b) == len(batches[0])]  # one batch size
            self.i, self.buf = 0, None

        def get_batch_size(self):
            return int(self.batches[0].shape[0])

        def get_batch(self, names):
            if self.i >= len(self.batches):
                return None
            self.buf = torch.from_numpy(np.ascontiguousarray(self.batches[self.i], np.float32)).cuda()
            self.i += 1
            return [int(self.buf.data_ptr())]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data):
            cache.write_bytes(bytes(data))

    return Calibrator()


class TensorRTRuntime:
    """Callable: float (B, C, H, W) CUDA tensor -> float32 output, like ``TorchRuntime``.

    ``precision``: "fp16" (default), "fp32" or "int8" (needs ``calibration``: a list of
    float32 batches drawn from the data). Batches up to ``max_batch`` are accepted.
    """

    name = "tensorrt"

    def __init__(self, module: torch.nn.Module, in_channels: int, size: int, device: torch.device,
                 precision: str = "fp16", max_batch: int = 512, opt_batch: int = 64,
                 calibration: list[np.ndarray] | None = None, workspace_gb: float = 4.0):
        from cxrscreen.runtime.onnx_export import cache_dir, export_onnx

        trt = import_tensorrt()
        if device.type != "cuda":
            raise RuntimeError("the TensorRT runtime needs a CUDA device")
        if precision == "int8" and not calibration:
            raise ValueError("INT8 needs calibration batches drawn from the data")
        self.trt, self.device = trt, device
        self.precision = "fp16" if precision in ("auto", "bf16") else precision
        self.shape = (in_channels, size, size)
        onnx_path = export_onnx(module, in_channels, size)
        gpu = torch.cuda.get_device_name(device)
        key = hashlib.sha256(f"{onnx_path.name}|{gpu}|{trt.__version__}|{self.precision}|{opt_batch}|"
                             f"{max_batch}".encode()).hexdigest()[:24]
        engine_path = cache_dir() / "tensorrt" / f"{onnx_path.stem}-{key}.engine"
        self.logger = trt.Logger(trt.Logger.WARNING)
        if not engine_path.exists():
            self._build(onnx_path, engine_path, max_batch, opt_batch, calibration, workspace_gb)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(engine_path.read_bytes())
        self.context = self.engine.create_execution_context()
        self.max_batch = max_batch

    def _build(self, onnx_path: Path, engine_path: Path, max_batch: int, opt_batch: int,
               calibration, workspace_gb: float) -> None:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        profile = builder.create_optimization_profile()
        profile.set_shape("x", (1, *self.shape), (min(opt_batch, max_batch), *self.shape), (max_batch, *self.shape))
        config.add_optimization_profile(profile)
        if self.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if self.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = _calibrator(trt, calibration, engine_path.with_suffix(".calib"))
            config.set_calibration_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path.name}")
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".engine", dir=engine_path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(serialized))
        os.replace(tmp, engine_path)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for chunk in x.split(self.max_batch):  # the profile's upper bound
            chunk = chunk.to(self.device, torch.float32, non_blocking=True).contiguous()
            self.context.set_input_shape("x", tuple(chunk.shape))
            y = torch.empty(tuple(self.context.get_tensor_shape("y")), device=self.device, dtype=torch.float32)
            self.context.set_tensor_address("x", chunk.data_ptr())
            self.context.set_tensor_address("y", y.data_ptr())
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            outs.append(y)
        return torch.cat(outs) if len(outs) > 1 else outs[0]
