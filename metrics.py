"""The paper's metrics in percent (accuracy, ROC AUC, retrieval recall), each with a 95% bootstrap
interval: the test set is resampled with replacement 1,000 times (seed 0) and the interval is the
2.5th to 97.5th percentile of the metric over the resamples (CheXzero reports its numbers so).

Every metric takes `counts` (R, n): how often each of the n test items is drawn in each of R
resamples, and returns its R values at once. Row 0 of `resample_counts` is the test set itself, so
one call gives the point value and the resamples together, with no loop over resamples.
"""

import numpy as np

RESAMPLES = 1000


def resample_counts(n, resamples=RESAMPLES, seed=0):
    """(1 + resamples, n): row 0 all ones (the test set as it is), then the draw counts of each
    resample of n items with replacement."""
    draws = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=resamples)
    return np.concatenate([np.ones((1, n)), draws]).astype(np.float32)  # exact up to 2**24


def mean_percent(per_item, counts):  # (R,) 100 x the mean of per_item (n,) in each resample
    return 100 * (counts @ per_item.astype(np.float32)).astype(np.float64) / per_item.size


def accuracy(probabilities, labels, counts):  # (R,) % of items whose top class is their label
    return mean_percent(np.argmax(probabilities, axis=1) == labels, counts)


def binary_auc(scores, positive, counts):
    """(R,) ROC AUC = P(score of a positive > score of a negative), ties counting one half, each
    item weighted by its count: nan where a resample has no positive or no negative."""
    order = np.argsort(scores, kind="stable")
    scores, positive, counts = scores[order], positive[order], counts[:, order]
    tied = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])  # (U,) first of each score
    # (R, U) the positives and the negatives at each distinct score
    positives = np.add.reduceat(counts * positive, tied, axis=1, dtype=float)
    negatives = np.add.reduceat(counts * ~positive, tied, axis=1, dtype=float)
    beaten = np.cumsum(negatives, axis=1) - negatives / 2  # negatives below, half of the tied
    pairs = positives.sum(axis=1) * negatives.sum(axis=1)  # (R,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (positives * beaten).sum(axis=1) / pairs


def auc(probabilities, labels, counts):
    """(R,) binary ROC AUC for two classes; otherwise the macro mean of one-vs-rest AUCs over the
    softmax scores, of the classes with a positive and a negative in the resample."""
    if probabilities.shape[1] == 2:
        return 100 * binary_auc(probabilities[:, 1], labels == 1, counts)
    per_class = np.stack([binary_auc(probabilities[:, c], labels == c, counts)
                          for c in range(probabilities.shape[1])])  # (C, R)
    present = ~np.isnan(per_class)
    with np.errstate(invalid="ignore"):  # nan for a resample that holds one class alone
        return 100 * np.where(present, per_class, 0).sum(axis=0) / present.sum(axis=0)


def recall_at_k(similarity, relevant, counts, ks=(1, 5, 10)):
    """similarity, relevant (queries, items); counts resample the queries, the gallery stays:
    {'R@k': (R,) % of queries with a relevant item in the top k}."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    return {f"R@{k}": mean_percent(hits[:, :k].any(axis=1), counts) for k in ks}


def summary(name, values):
    """values (seeds, 1 + R), from resample_counts' rows: {name: the point value (the mean over
    seeds), name_ci95: [low, high] of that mean over the resamples, and with several seeds name_sd
    (the sd of the seeds' point values) and name_per_seed (those values)}."""
    mean = values.mean(axis=0)  # (1 + R,)
    low, high = np.nanpercentile(mean[1:], [2.5, 97.5])
    out = {name: float(mean[0]), f"{name}_ci95": [float(low), float(high)]}
    if len(values) > 1:
        out[f"{name}_sd"] = float(values[:, 0].std(ddof=1))
        out[f"{name}_per_seed"] = values[:, 0].tolist()
    return out


def paired_gain(name, correct_after, correct_before):
    """The accuracy gain in points, after - before on the same items (n,), with a paired bootstrap
    interval (each resample draws the same items for both): {name, name_ci95}."""
    gain = correct_after.astype(np.float32) - correct_before
    return summary(name, mean_percent(gain, resample_counts(len(gain)))[None])
