"""RNG states in checkpoints: saved with the public getters of torch, NumPy and Python's random, through
``torch.load(weights_only=True)``, and restored so the next draws equal those of an uninterrupted run."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from fcnseg.checkpointing import RngStateCheckpoint


def draws() -> tuple:
    return torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)]


def test_rng_states_survive_a_weights_only_checkpoint_and_restore_the_same_draws():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    buffer = io.BytesIO()
    torch.save({"callbacks": RngStateCheckpoint().state_dict()}, buffer)
    expected = draws()  # what the uninterrupted run draws next
    draws()  # the killed run went on drawing before it died

    buffer.seek(0)
    restored = RngStateCheckpoint()
    restored.load_state_dict(torch.load(buffer, weights_only=True)["callbacks"])
    restored.on_train_start(None, None)
    got = draws()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
