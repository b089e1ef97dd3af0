import numpy as np

from cxrscreen.metrics import (classification_metrics, expected_calibration_error, fit_temperature,
                                        refer_threshold, softmax)


def test_metrics_on_a_known_confusion_matrix():
    # P2's confusion matrix: 20 TP, 1 FP, 0 FN, 19 TN (class 1 = positive)
    y = np.array([1] * 20 + [0] * 20)
    pred = np.array([1] * 20 + [1] * 1 + [0] * 19)
    probs = np.eye(2)[pred] * 0.9 + 0.05
    m = classification_metrics(y, probs, ["negative", "positive"])
    assert m["confusion_matrix"] == [[19, 1], [0, 20]]
    assert abs(m["accuracy"] - 39 / 40) < 1e-9
    pos, neg = m["per_class"]["positive"], m["per_class"]["negative"]
    assert abs(pos["precision"] - 20 / 21) < 1e-9 and pos["recall"] == 1.0
    assert neg["recall"] == 19 / 20 and neg["precision"] == 1.0 and pos["specificity"] == 19 / 20
    assert abs(m["macro_f1"] - (2 * 20 / 41 + 2 * 19 / 39) / 2) < 1e-9


def test_auc_perfect_and_random():
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 1, 1] * 50)
    perfect = np.stack([1 - y, y], 1).astype(float)
    assert classification_metrics(y, perfect, ["a", "b"])["per_class"]["b"]["auc"] == 1.0
    noise = rng.random((200, 2))
    assert abs(classification_metrics(y, noise / noise.sum(1, keepdims=True), ["a", "b"])["macro_auc"] - 0.5) < 0.1


def test_temperature_scaling_fixes_overconfidence():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 2000)
    logits = rng.normal(0, 1, (2000, 3))
    logits[np.arange(2000), y] += 1.0
    hot = logits * 4  # an overconfident model
    t = fit_temperature(hot, y)
    assert 3.0 < t < 5.5
    assert expected_calibration_error(softmax(hot, t), y) < expected_calibration_error(softmax(hot), y) / 2


def test_refer_threshold_reaches_target_sensitivity():
    y = np.array([0] * 10 + [1] * 10)
    probs = np.full((20, 2), 0.5)
    probs[:10] = [0.9, 0.1]
    probs[10:16] = [0.1, 0.9]  # 6 positives caught by the model
    probs[16:] = [0.6, 0.4]  # 4 missed, with confidence 0.6
    assert refer_threshold(probs, y, positive=1, target_sensitivity=0.6) == 0.0
    t = refer_threshold(probs, y, positive=1, target_sensitivity=1.0)
    assert 0.6 < t < 0.9  # refers the unsure ones, not the confident negatives


def test_reliability_bins_count_every_image_and_text_stays_readable():
    from cxrscreen.evaluate.plots import reliability, reliability_bins, text_colour

    probs = np.array([[0.95, 0.05], [0.92, 0.08], [0.55, 0.45], [0.3, 0.7]])
    y = np.array([0, 1, 0, 1])
    edges, acc, counts = reliability_bins(y, probs, bins=10)
    assert counts.sum() == 4 and counts[9] == 2 and counts[5] == 1 and counts[6] == 1
    assert acc[9] == 0.5 and acc[5] == 1.0 and np.isnan(acc[0])
    assert reliability(y, probs).startswith(b"\x89PNG")
    assert text_colour(90, 100) == "white" and text_colour(10, 100) == "black" and text_colour(0, 0) == "black"


def test_accuracy_at_coverage_3class_reads_covid_normal_viral_only():
    from cxrscreen.metrics import accuracy_at_coverage_3class

    classes = ["bacterial_pneumonia", "covid", "normal", "viral_pneumonia"]
    probs = np.array([[0.1, 0.6, 0.2, 0.1],   # covid, right
                      [0.7, 0.1, 0.05, 0.15],  # viral: bacterial is highest, but of the three viral is: right
                      [0.1, 0.5, 0.4, 0.0],   # normal called covid: wrong
                      [0.1, 0.1, 0.8, 0.0],   # normal, right but referred
                      [0.9, 0.0, 0.1, 0.0]])  # bacterial: not in the read-out
    y = np.array([1, 3, 2, 2, 0])
    got = accuracy_at_coverage_3class(y, probs, np.array([False, False, False, True, False]), classes)
    assert got == {"coverage": 0.75, "accuracy": 2 / 3, "n": 4}
    assert accuracy_at_coverage_3class(y[:3], probs[:3, 1:], np.zeros(3, bool), classes[1:]) is None  # 3 classes only
