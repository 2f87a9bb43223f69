from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

from fer_core.metrics import au_metrics, classification_metrics


@st.composite
def labelled_scores(draw):
    n_classes = draw(st.integers(2, 6))
    n = draw(st.integers(1, 60))
    y = np.array(draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n)))
    scores = np.array(draw(st.lists(st.lists(st.floats(0, 1, width=32), min_size=n_classes, max_size=n_classes),
                                    min_size=n, max_size=n)), dtype=np.float64)
    scores += np.arange(n_classes) * 1e-6  # deterministic argmax ties
    return y, scores, [f"c{i}" for i in range(n_classes)]


@settings(max_examples=60, deadline=None)
@given(labelled_scores())
def test_metrics_agree_with_scikit_learn(data):
    y, scores, classes = data
    m = classification_metrics(y, scores, classes)
    pred = scores.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, labels=sorted(set(y)), average="macro", zero_division=0))
    cm = np.array(m["confusion_matrix"])
    assert (cm == confusion_matrix(y, pred, labels=range(len(classes)))).all()
    assert cm.sum() == len(y)
    assert [m["per_class"][c]["support"] for c in classes] == cm.sum(1).tolist()
    for i, c in enumerate(classes):
        row = m["per_class"][c]
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        if cm[i].sum():
            assert row["recall"] == pytest.approx(cm[i, i] / cm[i].sum())


def test_known_example():
    y = [0, 0, 1, 1, 2, 2]
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]]
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "support": 2}
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["classes"] == ["a", "b", "c"]


def test_au_f1_ignores_unlabelled_samples():
    au_true = np.array([[1, 0], [0, 1], [1, 1]])
    au_prob = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.1]])
    mask = np.array([[1, 1], [1, 1], [0, 0]])  # third sample carries no AU labels
    m = au_metrics(au_true, au_prob, mask, ["AU1", "AU2"])
    assert m["au_f1"] == {"AU1": 1.0, "AU2": 1.0}
    m_all = au_metrics(au_true, au_prob, None, ["AU1", "AU2"])
    assert m_all["au_f1"]["AU1"] == pytest.approx(f1_score([1, 0, 1], [1, 0, 0]))
    assert m_all["au_mean_f1"] == pytest.approx(np.mean(list(m_all["au_f1"].values())))
