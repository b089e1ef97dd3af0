"""cxrscreen: batch screening of chest X-rays (decode -> preprocess -> models -> Ray pipeline).

``cxrscreen.score(archive)`` and ``cxrscreen.Screener(classifier, segmenter)(images)`` are the
Python API (``cxrscreen.api``); they are imported on first use, so ``import cxrscreen`` is light.
"""

__version__ = "0.1.0"
__all__ = ["Screener", "score", "__version__"]


def __getattr__(name):
    if name in ("Screener", "score"):
        from cxrscreen import api

        return getattr(api, name)
    raise AttributeError(f"module 'cxrscreen' has no attribute {name!r}")
