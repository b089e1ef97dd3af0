"""Evaluation: metrics, calibration (temperature scaling, ECE) and the refer threshold;
``cxrscreen.evaluate.run.evaluate_model`` evaluates a trained checkpoint."""

from cxrscreen.metrics import (classification_metrics, confusion_matrix, expected_calibration_error,
                                        fit_temperature, refer_threshold, roc_auc_ovr)

__all__ = ["classification_metrics", "confusion_matrix", "expected_calibration_error", "fit_temperature",
           "refer_threshold", "roc_auc_ovr"]
