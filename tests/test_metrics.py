"""The metric code against ranks computed by hand on small score matrices."""

import numpy as np
import pytest
import torch

from mmca.metrics import average_folds, ranks_from_scores, retrieval_metrics

KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
        "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr"]

# 2 images x 10 captions, captions 0-4 describe image 0 and captions 5-9 image 1.
FIVE_EACH = np.array([
    [0.1, 0.5, 0.2, 0.3, 0.0, 0.6, 0.4, 0.5, 0.1, 0.9],
    [0.2, 0.2, 0.2, 0.2, 0.2, 0.1, 0.3, 0.0, 0.0, 0.0],
])
FIVE_OWNER = np.repeat([0, 1], 5)
# By hand. Image 0: its best caption scores 0.5; other captions at >= 0.5 are 0.6, 0.5 (a tie
# counts against it) and 0.9 -> 3. Image 1: best 0.3; none of captions 0-4 reaches it -> 0.
FIVE_I2T = [3, 0]
# Caption j: does the other image score >= the true one? 0.2>=0.1, 0.2<0.5, 0.2>=0.2 (tie),
# 0.2<0.3, 0.2>=0.0; then 0.6>=0.1, 0.4>=0.3, 0.5>=0.0, 0.1>=0.0, 0.9>=0.0.
FIVE_T2I = [1, 0, 1, 0, 1, 1, 1, 1, 1, 1]


def test_best_of_five_captions_by_hand():
    i2t, t2i = ranks_from_scores(FIVE_EACH, FIVE_OWNER)
    assert i2t.tolist() == FIVE_I2T
    assert t2i.tolist() == FIVE_T2I


def test_caption_order_does_not_matter():
    perm = np.array([9, 0, 5, 1, 6, 2, 7, 3, 8, 4])  # captions interleaved across images
    i2t, t2i = ranks_from_scores(FIVE_EACH[:, perm], FIVE_OWNER[perm])
    assert i2t.tolist() == FIVE_I2T
    assert t2i.tolist() == np.array(FIVE_T2I)[perm].tolist()


def test_metrics_of_the_five_caption_example_by_hand():
    m = retrieval_metrics(np.array(FIVE_I2T), np.array(FIVE_T2I))
    assert list(m) == KEYS
    assert m["i2t_r1"] == 50.0 and m["i2t_r5"] == 100.0 and m["i2t_r10"] == 100.0
    assert m["t2i_r1"] == 20.0 and m["t2i_r5"] == 100.0 and m["t2i_r10"] == 100.0
    assert m["rsum"] == 470.0
    assert m["i2t_medr"] == 2.0 and m["i2t_meanr"] == 2.5  # ranks 3 and 0: floor(median 1.5) + 1, as SCAN / VSE++
    assert m["t2i_medr"] == 2.0 and m["t2i_meanr"] == pytest.approx(1.8)  # eight 2s, two 1s


def test_all_equal_scores_count_ties_against_the_true_item():
    n, cpi = 11, 5
    i2t, t2i = ranks_from_scores(np.full((n, n * cpi), 0.3), np.repeat(np.arange(n), cpi))
    assert (t2i == n - 1).all()  # every other image ties with the true one
    assert (i2t == n * cpi - cpi).all()  # every caption of another image ties
    m = retrieval_metrics(i2t, t2i)
    assert all(m[f"{d}_r{k}"] == 0.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert m["rsum"] == 0.0
    assert m["t2i_medr"] == m["t2i_meanr"] == n  # 1-based


def test_staircase_ranks_and_one_based_median_and_mean():
    # One caption per image; S[i, j] = 1 above the diagonal, 0.5 on it, 0 below. Caption j
    # is beaten by images 0..j-1 (rank j); image i by captions i+1..11 (rank 11 - i).
    n = 12
    s = np.triu(np.ones((n, n)), 1) + 0.5 * np.eye(n)
    i2t, t2i = ranks_from_scores(torch.tensor(s, dtype=torch.bfloat16), np.arange(n))
    assert t2i.tolist() == list(range(n))
    assert i2t.tolist() == list(range(n - 1, -1, -1))
    m = retrieval_metrics(i2t, t2i)
    for d in ("i2t", "t2i"):
        assert m[f"{d}_r1"] == pytest.approx(100 / 12)
        assert m[f"{d}_r5"] == pytest.approx(500 / 12)
        assert m[f"{d}_r10"] == pytest.approx(1000 / 12)
        assert m[f"{d}_medr"] == 6.0 and m[f"{d}_meanr"] == 6.5  # 1..12: floor(median 5.5) + 1 = 6


def test_exact_below_keeps_only_what_the_ranks_determine():
    # Ranks at or past the cap are lower bounds (here reported as the cap itself).
    ranks = np.array([0, 2, 7, 10, 10])
    m = retrieval_metrics(ranks, ranks, exact_below=10)
    assert (m["i2t_r1"], m["i2t_r5"], m["i2t_r10"]) == (20.0, 40.0, 60.0)
    assert m["rsum"] == 240.0
    assert m["i2t_medr"] == 8.0  # the middle rank, 7, is exact
    assert m["i2t_meanr"] is None  # two ranks are only bounds

    m = retrieval_metrics(ranks, ranks, exact_below=5)
    assert m["i2t_r5"] == 40.0 and m["i2t_r10"] is None and m["rsum"] is None
    assert m["i2t_medr"] is None  # the middle rank, 7, is past the cap

    # Even count: the median averages the two middle ranks, so both must be exact.
    assert retrieval_metrics(np.array([0, 1, 3, 20]), ranks, exact_below=5)["i2t_medr"] == 3.0
    assert retrieval_metrics(np.array([0, 1, 5, 20]), ranks, exact_below=5)["i2t_medr"] is None

    # A bound that already reaches K settles rank < K.
    assert retrieval_metrics(np.array([0, 2, 12]), ranks, exact_below=5)["i2t_r10"] == pytest.approx(200 / 3)

    all_exact = retrieval_metrics(np.array([0, 1, 3]), np.array([4, 0, 0]), exact_below=5)
    assert all_exact == retrieval_metrics(np.array([0, 1, 3]), np.array([4, 0, 0]))


def test_two_folds_averaged_by_hand():
    # 4 images, 2 captions each; fold 0 = images 0-1 and captions 0-3, fold 1 = images 2-3.
    s = np.full((4, 8), 5.0)  # pairs across folds score high: they must not count
    s[0, :4] = [0.9, 0.8, 0.1, 0.1]  # image 0: best own 0.9 -> rank 0
    s[1, :4] = [0.1, 0.9, 0.5, 0.4]  # image 1: best own 0.5; caption 1 (0.9) beats it -> rank 1
    s[2, 4:] = [0.7, 0.7, 0.7, 0.7]  # image 2: ties with both captions of image 3 -> rank 2
    s[3, 4:] = [0.1, 0.2, 0.8, 0.3]  # image 3: best own 0.8 -> rank 0
    owner = np.repeat(np.arange(4), 2)
    folds = []
    for lo in (0, 2):
        imgs, caps = slice(lo, lo + 2), slice(2 * lo, 2 * lo + 4)
        i2t, t2i = ranks_from_scores(s[imgs, caps], owner[caps] - lo)
        folds.append(retrieval_metrics(i2t, t2i))
    # t2i, fold 0: caption 0 (0.9 vs 0.1) 0; caption 1 (0.8 vs 0.9) 1; caption 2 (0.5 vs 0.1) 0;
    # caption 3 (0.4 vs 0.1) 0. Fold 1: captions 4, 5 (0.7 vs 0.1, 0.2) 0; captions 6, 7
    # (0.8 vs 0.7; 0.3 vs 0.7) 0 and 1.
    assert folds[0]["i2t_r1"] == 50.0 and folds[1]["i2t_r1"] == 50.0
    assert folds[0]["t2i_r1"] == 75.0 and folds[1]["t2i_r1"] == 75.0
    assert folds[0]["i2t_meanr"] == 1.5 and folds[1]["i2t_meanr"] == 2.0  # (1+2)/2, (3+1)/2
    mean = average_folds(folds)
    assert mean["i2t_r1"] == 50.0 and mean["t2i_r1"] == 75.0
    assert mean["i2t_meanr"] == 1.75 and mean["t2i_meanr"] == 1.25
    assert mean["rsum"] == (folds[0]["rsum"] + folds[1]["rsum"]) / 2 == 525.0


def test_average_folds_propagates_unknown_values():
    a = {"i2t_r1": 10.0, "i2t_meanr": 3.0}
    b = {"i2t_r1": 30.0, "i2t_meanr": None}
    assert average_folds([a, b]) == {"i2t_r1": 20.0, "i2t_meanr": None}
    with pytest.raises(ValueError):
        average_folds([])


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        ranks_from_scores(np.zeros((2, 4)), [0, 1, 1])
    with pytest.raises(ValueError, match="no caption"):
        ranks_from_scores(np.zeros((3, 4)), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(np.array([[np.nan, 0.0], [0.0, 1.0]]), [0, 1])
