"""The per-epoch order of prepared windows (trainer/data/permutation.py): a bijection on [0, n) for every n, drawn
from (seed, epoch), shuffled like a random permutation, and evaluated at one place without building the order."""

import numpy as np
import pytest

from trainer.data.permutation import Permutation


def order(n: int, seed: int = 0, epoch: int = 0) -> np.ndarray:
    perm = Permutation(n, seed, epoch)
    return np.array([perm(i) for i in range(n)])


# every small n (odd and even bit widths, powers of two and their neighbours) and a few larger ones
@pytest.mark.parametrize("n", [*range(1, 34), 255, 256, 257, 4095, 4097, 5187, 65_537])
def test_every_place_holds_a_distinct_window(n):
    for seed, epoch in ((0, 0), (3, 1), (12345, 999)):
        assert sorted(order(n, seed, epoch).tolist()) == list(range(n)), (n, seed, epoch)


def test_the_order_is_drawn_from_seed_and_epoch():
    n = 5187  # c4_test's windows at seq 128
    assert np.array_equal(order(n, 7, 2), order(n, 7, 2))  # a resumed run recomputes the very order
    orders = [order(n, seed, epoch) for seed, epoch in ((7, 0), (7, 1), (7, 2), (8, 0), (0, 7))]
    assert len({o.tobytes() for o in orders}) == len(orders)


def test_the_order_looks_like_a_random_permutation():
    # numpy's shuffle of 5,187 places: |rank correlation| ~0.01, ~1 fixed point, ~73% distinct steps p(i+1) - p(i)
    n = 5187
    for seed, epoch in ((0, 0), (1, 5), (9, 2)):
        p = order(n, seed, epoch)
        assert abs(np.corrcoef(np.arange(n), p)[0, 1]) < 0.06
        assert (p == np.arange(n)).sum() <= 6
        assert 0.70 < len(set(np.diff(p).tolist())) / (n - 1) < 0.77  # not a stride pattern
        assert 0.45 < (p[: n // 2] < n // 2).mean() < 0.55  # the first half of the epoch reads both halves


def test_a_place_costs_the_same_in_a_corpus_of_any_size():
    # 2^40 windows (140 T tokens at seq 128): nothing is built, each place is a few rounds of arithmetic
    n = (1 << 40) + 7
    perm = Permutation(n, 0, 0)
    places = [0, 1, 2, n // 2, n - 1]
    got = [perm(i) for i in places]
    assert len(set(got)) == len(places) and all(0 <= g < n for g in got)
    with pytest.raises(IndexError):
        perm(n)
    with pytest.raises(ValueError, match="n >= 1"):
        Permutation(0, 0, 0)
