"""Randomness as a function of the position in training.

The data order of epoch e, the negatives of optimizer step s and the LoRA dropout of step s on
rank k are drawn from generators seeded with (seed, purpose, position), so a resumed run and a run
with another world size replay exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch

# Purposes: one stream each, so e.g. more negatives never shift the data order. RANDOM_INIT seeds the
# similarity stage's random-init control backbone (not `seed` itself: the tiny backbone is built with it).
ORDER, NEGATIVES, DROPOUT, RANDOM_INIT = 1, 2, 3, 4


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, purpose, position, ...)."""
    words = [int(p) % 2**64 for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def generator(*parts: int) -> torch.Generator:
    """A torch generator seeded with `derive_seed(*parts)`."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the n training queries in epoch `epoch`."""
    return torch.randperm(n, generator=generator(seed, ORDER, epoch))
