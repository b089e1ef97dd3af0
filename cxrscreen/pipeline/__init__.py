"""The scoring pipeline: decode -> segment -> classify -> Parquet, with or without Ray."""

from cxrscreen.pipeline.config import ClassifierOptions, RuntimeOptions, ScoreConfig, SegmenterOptions
from cxrscreen.io.batch import decode_batch, decode_items
from cxrscreen.pipeline.stages import Classifier, Segmenter
from cxrscreen.pipeline.score import score_archive, score_items_local

__all__ = ["ScoreConfig", "ClassifierOptions", "RuntimeOptions", "SegmenterOptions", "Classifier", "Segmenter", "decode_batch", "decode_items", "score_archive",
           "score_items_local"]
