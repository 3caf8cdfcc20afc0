"""A seeded permutation of [0, n) evaluated one index at a time in O(1) time and memory: the order of an epoch of
prepared windows, so that reading window g costs the same at any dp degree and corpus size.

A Feistel network is a bijection on b-bit integers whatever its round function: each round maps (L, R) to
(R, L xor F(R)), which (R, L xor F(R)) undoes. Four rounds, each with its own 64-bit key drawn from (seed, epoch),
give a well-shuffled order (Luby and Rackoff's construction; the format-preserving encryption of NIST SP 800-38G
uses the same idea). F is multiplicative hashing, the top bits of (R xor key) times an odd 64-bit constant: one
multiply, so a window's place costs about a microsecond at any n. b is the bit length of n - 1, so the network permutes [0, 2^b), under 2n values; an index
whose image falls at n or beyond is mapped again until it lands in [0, n) ("cycle walking"), which keeps the map a
bijection on [0, n) and takes under 2 rounds of the network on average. The halves may differ by one bit (an
unbalanced network), so b need not be even.
"""

MASK64 = (1 << 64) - 1
ROUNDS = 4
GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / the golden ratio, odd: Knuth's multiplicative hashing constant


def mix64(x: int) -> int:
    """SplitMix64's finalizer: a bijective 64-bit hash in which every input bit flips about half the output bits."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class Permutation:
    """The permutation of [0, n) drawn from (seed, epoch): `perm(i)` is the i-th element of the order."""

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"a permutation of [0, {n}) needs n >= 1")
        self.n, self.epoch = n, epoch
        bits = (n - 1).bit_length()
        self._widths = (bits // 2, bits - bits // 2)  # (L, R) bits; they swap every round
        base = mix64((seed * GOLDEN + epoch) & MASK64)
        self._keys = [mix64((base + r + 1) * GOLDEN & MASK64) for r in range(ROUNDS)]

    def _network(self, x: int) -> int:
        wl, wr = self._widths
        left, right = x >> wr, x & ((1 << wr) - 1)
        for key in self._keys:
            # F(R): the top wl bits of the 64-bit product (the well-mixed ones), which is what L may take
            left, right = right, left ^ (((right ^ key) * GOLDEN & MASK64) >> (64 - wl))
            wl, wr = wr, wl
        return (left << wr) | right

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} outside [0, {self.n})")
        index = self._network(index)
        while index >= self.n:  # ends: the cycle through a value below n returns below n
            index = self._network(index)
        return index
