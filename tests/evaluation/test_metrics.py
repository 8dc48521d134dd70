"""Evaluation metrics against hand-computed values and scikit-learn, and the report plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, brier_score_loss, recall_score, roc_auc_score

from wsi_fl.evaluation.metrics import bootstrap_ci, classification_metrics
from wsi_fl.evaluation.plots import plot_calibration, plot_roc

# Four negatives and four positives; of the 16 (positive, negative) pairs, 11 are ordered correctly.
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
P1 = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.6, 0.7, 0.9])
PROBS = np.stack([1 - P1, P1], axis=1)
CLASSES = ["benign", "tumour"]


def _noisy_binary(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = 1 / (1 + np.exp(-(2.0 * (y - 0.5) + rng.normal(size=n))))
    return y, np.stack([1 - s, s], axis=1)


def _multiclass(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.5
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, p.astype(np.float32)  # float32 softmax, as the model produces


def _json_ok(m: dict) -> None:
    json.dumps(m, allow_nan=False)


def test_binary_metrics_match_hand_computed_and_sklearn():
    m = classification_metrics(Y, PROBS, classes=CLASSES, n_bootstrap=200)
    _json_ok(m)
    assert m["task"] == "binary" and m["classes"] == CLASSES
    assert m["n"] == 8 and m["n_positive"] == 4
    assert m["auc"] == pytest.approx(11 / 16) == pytest.approx(roc_auc_score(Y, P1))
    # threshold 0.5: predicted positive = [0,0,0,1 | 0,1,1,1]
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    assert m["sensitivity"] == pytest.approx(0.75) and m["specificity"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.75) and m["balanced_accuracy"] == pytest.approx(0.75)
    brier = (0.01 + 0.16 + 0.1225 + 0.64 + 0.64 + 0.16 + 0.09 + 0.01) / 8
    assert m["brier"] == pytest.approx(brier) == pytest.approx(brier_score_loss(Y, P1))
    lo, hi = m["auc_ci95"]
    assert lo <= m["auc"] <= hi
    assert 0 < m["n_bootstrap_used"] <= m["n_bootstrap"] == 200


def test_calibration_bins_hand_computed():
    cal = classification_metrics(Y, PROBS, classes=CLASSES, n_bootstrap=0, n_bins=2)["calibration"]
    # [0, 0.5): 0.1, 0.4, 0.35, 0.2 (one positive); [0.5, 1]: 0.8, 0.6, 0.7, 0.9 (three positives)
    assert cal["count"] == [4, 4]
    assert cal["prob_true"] == pytest.approx([0.25, 0.75])
    assert cal["prob_pred"] == pytest.approx([0.2625, 0.75])


def test_threshold_moves_sensitivity_and_specificity_in_opposite_directions():
    rows = [classification_metrics(Y, PROBS, classes=CLASSES, threshold=t, n_bootstrap=0) for t in (0.15, 0.3, 0.5)]
    assert [r["sensitivity"] for r in rows] == pytest.approx([1.0, 0.75, 0.75])
    assert [r["specificity"] for r in rows] == pytest.approx([0.25, 0.25, 0.75])
    assert all(r["auc"] == rows[0]["auc"] for r in rows)  # the AUC does not depend on the threshold
    sweep = [classification_metrics(Y, PROBS, classes=CLASSES, threshold=t, n_bootstrap=0) for t in P1]
    sweep.sort(key=lambda r: r["threshold"])
    sens, spec = [r["sensitivity"] for r in sweep], [r["specificity"] for r in sweep]
    assert sens == sorted(sens, reverse=True) and spec == sorted(spec)


def test_perfect_classifier_has_auc_one_with_degenerate_interval():
    y = np.array([0] * 10 + [1] * 10)
    s = np.concatenate([np.linspace(0.0, 0.4, 10), np.linspace(0.6, 1.0, 10)])
    m = classification_metrics(y, np.stack([1 - s, s], axis=1), classes=CLASSES, n_bootstrap=200)
    assert m["auc"] == 1.0 and m["auc_ci95"] == [1.0, 1.0]
    assert m["sensitivity"] == m["specificity"] == m["accuracy"] == 1.0


def test_bootstrap_is_deterministic_contains_estimate_and_narrows_with_n():
    y, p = _noisy_binary(60, seed=1)

    def auc(yb: np.ndarray, pb: np.ndarray) -> float:
        return roc_auc_score(yb, pb[:, 1])

    a = bootstrap_ci(auc, y, p, 150, seed=7)
    assert a == bootstrap_ci(auc, y, p, 150, seed=7)
    assert a != bootstrap_ci(auc, y, p, 150, seed=8)
    assert a[0] <= auc(y, p) <= a[1] and a[2] == 150

    widths = []
    for n in (40, 640):
        y, p = _noisy_binary(n, seed=2)
        m = classification_metrics(y, p, classes=CLASSES, n_bootstrap=100, seed=3)
        lo, hi = m["auc_ci95"]
        assert lo <= m["auc"] <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 16x the slides, about a quarter of the width


def test_bootstrap_skips_and_counts_resamples_lacking_a_class():
    y = np.array([0, 0, 0, 1])
    s = np.array([0.1, 0.2, 0.7, 0.9])
    m = classification_metrics(y, np.stack([1 - s, s], axis=1), classes=CLASSES, n_bootstrap=200, seed=0)
    # A resample misses the single positive with probability (3/4)^4 ~ 0.32.
    assert 100 < m["n_bootstrap_used"] < 170
    assert m["auc"] == 1.0 and m["auc_ci95"] == [1.0, 1.0]


def test_multiclass_metrics_match_sklearn():
    classes = ["a", "b", "c"]
    y, p = _multiclass(90, seed=4)
    m = classification_metrics(y, p, classes=classes, n_bootstrap=100)
    _json_ok(m)
    p64 = p.astype(np.float64) / p.astype(np.float64).sum(axis=1, keepdims=True)
    pred = p64.argmax(axis=1)
    assert m["task"] == "multiclass" and "n_positive" not in m
    assert m["auc"] == pytest.approx(roc_auc_score(y, p64, multi_class="ovr", average="macro"))
    assert m["auc_per_class"]["b"] == pytest.approx(roc_auc_score(y == 1, p64[:, 1]))
    lo, hi = m["auc_ci95"]
    assert lo <= m["auc"] <= hi
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 90 and cm.sum(axis=1).tolist() == [30, 30, 30]
    assert list(m["sensitivity"].values()) == pytest.approx(recall_score(y, pred, average=None))
    onehot = np.eye(3)[y]
    assert m["brier"] == pytest.approx(np.mean(np.sum((p64 - onehot) ** 2, axis=1)))
    cal = m["calibration"]
    assert cal["target"] == "top-class confidence" and sum(cal["count"]) == 90
    assert min(cal["prob_pred"]) >= 1 / 3 - 1e-9  # the top class of three has at least a third


def test_single_class_input_gives_none_with_a_note_not_a_crash():
    y = np.zeros(6, dtype=int)
    s = np.linspace(0.1, 0.7, 6)
    m = classification_metrics(y, np.stack([1 - s, s], axis=1), classes=CLASSES, n_bootstrap=50)
    _json_ok(m)
    assert m["auc"] is None and m["auc_ci95"] is None and m["n_bootstrap_used"] == 0
    assert "tumour" in m["note"]
    assert m["sensitivity"] is None and m["specificity"] == pytest.approx(4 / 6)  # 0.1 .. 0.46 below 0.5
    assert m["brier"] == pytest.approx(np.mean(s**2))

    y3, p3 = _multiclass(30, seed=5)
    keep = y3 != 2
    m3 = classification_metrics(y3[keep], p3[keep], classes=["a", "b", "c"], n_bootstrap=50)
    _json_ok(m3)
    assert m3["auc"] is None and "c" in m3["note"]
    assert m3["auc_per_class"]["a"] is not None and m3["auc_per_class"]["c"] is None
    assert m3["sensitivity"]["c"] is None


def test_bad_inputs_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="sum to 1"):
        classification_metrics(Y, PROBS * 0.5, classes=CLASSES)
    with pytest.raises(ValueError, match="classes"):
        classification_metrics(Y, PROBS, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="y_true"):
        classification_metrics(Y[:-1], PROBS, classes=CLASSES)
    with pytest.raises(ValueError, match="no samples"):
        classification_metrics(np.array([], int), np.zeros((0, 2)), classes=CLASSES)


def _png(path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        assert np.asarray(img.convert("L")).std() > 0  # something was drawn
        return img.size


def test_plots_write_complete_pngs(tmp_path):
    y3, p3 = _multiclass(60, seed=6)
    written = [
        plot_roc(Y, PROBS, tmp_path / "roc.png", classes=CLASSES, title="binary"),
        plot_roc(y3, p3, tmp_path / "sub" / "roc3.png", classes=["a", "b", "c"]),
        plot_roc(np.zeros(8, int), PROBS, tmp_path / "roc_single.png", classes=CLASSES),
        plot_calibration(Y, PROBS, tmp_path / "cal.png", n_bins=5),
        plot_calibration(y3, p3, tmp_path / "cal3.png"),
    ]
    for path in written:
        w, h = _png(path)
        assert w > 100 and h > 100
    assert not list(tmp_path.rglob("*.partial"))
