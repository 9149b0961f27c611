"""metrics.py: accuracy, AUC and recall against brute force, on the test set and on each bootstrap
resample; intervals with the binomial width; several seeds; the paired interval of a gain."""

import numpy as np
import pytest

import metrics


def brute_force_auc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])


def point(metric, *arrays, **kwargs):  # the metric on the test set itself (row 0 of the counts)
    return metric(*arrays, metrics.resample_counts(len(arrays[-1]), resamples=0), **kwargs)


@pytest.mark.parametrize("seed", range(5))
def test_binary_auc_equals_the_pair_count(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 40) / 5  # few distinct values: many ties
    positive = rng.random(40) < 0.4
    assert point(metrics.binary_auc, scores, positive)[0] == pytest.approx(
        brute_force_auc(scores, positive))
    probabilities = np.stack([1 - scores, scores], axis=1)
    assert point(metrics.auc, probabilities, positive.astype(int))[0] == pytest.approx(
        100 * brute_force_auc(scores, positive))


def test_each_resample_is_scored_as_the_drawn_test_set():
    """Row r of the counts draws item i counts[r, i] times: every metric equals the metric of
    that expanded test set, computed by brute force."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 30)
    probabilities = rng.dirichlet(np.ones(3), 30).round(1)  # rounded: ties
    counts = metrics.resample_counts(30, resamples=20)
    assert (counts[0] == 1).all() and (counts.sum(axis=1) == 30).all()
    assert not (counts[1:] == 1).all(axis=1).any()  # the resamples differ from the test set
    accuracy = metrics.accuracy(probabilities, labels, counts)
    auc = metrics.auc(probabilities, labels, counts)
    for r in range(len(counts)):
        drawn = np.repeat(np.arange(30), counts[r].astype(int))
        p, y = probabilities[drawn], labels[drawn]
        assert accuracy[r] == pytest.approx(100 * np.mean(p.argmax(axis=1) == y))
        per_class = [brute_force_auc(p[:, c], y == c) for c in range(3) if 0 < (y == c).sum() < 30]
        assert auc[r] == pytest.approx(100 * np.mean(per_class))


def test_multiclass_auc_is_the_macro_one_vs_rest_mean():
    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=(60, 4)), 1)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 4, 60)
    expected = np.mean([brute_force_auc(probabilities[:, c], labels == c) for c in range(4)])
    assert point(metrics.auc, probabilities, labels)[0] == pytest.approx(100 * expected)
    assert point(metrics.auc, np.eye(3)[[0, 1, 2, 0]], np.array([0, 1, 2, 0]))[0] == 100.0


def test_accuracy_and_recall_on_hand_made_cases():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert point(metrics.accuracy, probabilities, np.array([0, 1, 1, 1]))[0] == 75.0
    similarity = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])  # 2 queries, 3 items
    relevant = np.array([[False, True, False], [False, False, True]])
    counts = metrics.resample_counts(2, resamples=0)
    recall = metrics.recall_at_k(similarity, relevant, counts, ks=(1, 2, 3))
    assert {k: v[0] for k, v in recall.items()} == {"R@1": 50.0, "R@2": 50.0, "R@3": 100.0}
    twice_the_second = np.array([[0.0, 2.0]])  # a resample drawing only the second query
    assert metrics.recall_at_k(similarity, relevant, twice_the_second, ks=(1,))["R@1"][0] == 100


@pytest.mark.parametrize("p", [0.5, 0.7, 0.9])
def test_an_accuracy_interval_holds_its_value_and_has_the_binomial_width(p):
    """1,000 images: the 95% interval of an accuracy p is about +-1.96 sqrt(p (1 - p) / n)."""
    n = 1000
    labels = np.zeros(n, int)
    right = np.random.default_rng(1).permutation(n) < p * n
    probabilities = np.stack([right, ~right], axis=1).astype(float)
    result = metrics.summary("acc", metrics.accuracy(probabilities, labels,
                                                     metrics.resample_counts(n))[None])
    low, high = result["acc_ci95"]
    assert result["acc"] == pytest.approx(100 * p) and low < result["acc"] < high
    binomial = 2 * 1.96 * 100 * np.sqrt(p * (1 - p) / n)
    assert high - low == pytest.approx(binomial, rel=0.15)
    assert "acc_sd" not in result  # one seed


def test_seeds_give_the_mean_the_sd_and_the_interval_of_the_mean():
    values = np.array([[60.0, 58, 62, 61], [64.0, 63, 66, 65]])  # 2 seeds x (test set, 3 resamples)
    result = metrics.summary("acc", values)
    assert result["acc"] == 62.0 and result["acc_sd"] == pytest.approx(np.std([60, 64], ddof=1))
    assert result["acc_per_seed"] == [60.0, 64.0]
    assert result["acc_ci95"] == pytest.approx(list(np.percentile([60.5, 64, 63], [2.5, 97.5])))


def test_the_paired_gain_interval_resamples_the_same_images_for_both():
    """A prompt right on 20 more of 1,000 images and wrong on none that the other gets right: a
    +2.0 gain, whose paired interval is far narrower than unpaired intervals would suggest, and
    excludes zero."""
    before = np.random.default_rng(0).random(1000) < 0.6
    after = before.copy()
    after[np.flatnonzero(~before)[:20]] = True
    gain = metrics.paired_gain("gain", after, before)
    low, high = gain["gain_ci95"]
    assert gain["gain"] == pytest.approx(2.0) and 0 < low < 2.0 < high < 4.0
    assert high - low < 2 * 1.96 * 100 * np.sqrt(0.6 * 0.4 / 1000)  # one accuracy's width
    assert metrics.paired_gain("gain", before, before)["gain_ci95"] == [0.0, 0.0]
