"""The scoring pipeline: decode -> segment -> classify -> Parquet, with or without Ray.

Names are imported on first use, so that reading the settings (``cxrscreen.pipeline.config``)
does not load torch and Ray."""

from importlib import import_module

_WHERE = {"ScoreConfig": "config", "ClassifierOptions": "config", "RuntimeOptions": "config",
          "SegmenterOptions": "config", "Classifier": "stages", "Segmenter": "stages",
          "score_archive": "score", "score_items_local": "score"}
_IO = {"decode_batch", "decode_items"}

__all__ = sorted([*_WHERE, *_IO])


def __getattr__(name: str):
    if name in _IO:
        return getattr(import_module("cxrscreen.io.batch"), name)
    if name in _WHERE:
        return getattr(import_module(f"cxrscreen.pipeline.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'cxrscreen.pipeline' has no attribute {name!r}")
