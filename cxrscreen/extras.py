"""Optional dependencies, imported where they are used, with a message naming the extra."""

from __future__ import annotations

import importlib

EXTRAS = {"matplotlib": "report", "sklearn": "report", "tensorrt": "tensorrt"}


def require(module: str):
    """``importlib.import_module(module)``, or an ImportError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        hint = f"pip install 'cxrscreen[{extra}]'" if extra else f"pip install {top}"
        raise ImportError(f"{top} is needed here but not installed: {hint}") from e
