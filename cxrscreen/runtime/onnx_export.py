"""Export a registry model to ONNX with a dynamic batch axis, cached on disk by content key."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import torch


def cache_dir() -> Path:
    """``$CXRSCREEN_CACHE`` or ``~/.cache/cxrscreen``: exported ONNX files and TensorRT engines."""
    return Path(os.environ.get("CXRSCREEN_CACHE", Path.home() / ".cache" / "cxrscreen"))


def module_key(module: torch.nn.Module, input_shape: tuple[int, ...]) -> str:
    """Content hash of the weights, the input shape and the torch version (an export's identity)."""
    h = hashlib.sha256(f"{type(module).__name__}{input_shape}{torch.__version__}".encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def _export(module: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    kw = dict(input_names=["x"], output_names=["y"], opset_version=18)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:  # the torch.export-based exporter; the TorchScript one for what it cannot trace
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(module, (x,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},), **kw)
        except Exception:  # noqa: BLE001
            torch.onnx.export(module, (x,), str(path), dynamo=False, dynamic_axes={"x": {0: "batch"}}, **kw)


def export_onnx(module: torch.nn.Module, in_channels: int, size: int) -> Path:
    """The ONNX file of ``module`` (input ``x`` float (B, C, size, size), output ``y``), exported
    once per weights and written atomically, so concurrent actors can share the cache."""
    module = module.eval().cpu().to(memory_format=torch.contiguous_format)
    x = torch.zeros(2, in_channels, size, size)
    path = cache_dir() / "onnx" / f"{type(module).__name__}-{module_key(module, tuple(x.shape[1:]))}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        _export(module, x, Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
