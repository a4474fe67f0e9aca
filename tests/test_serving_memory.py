"""A served model gives back the memory a forward pass freed: answering a request trims glibc's heaps, so a burst of
photos does not leave the server at its high-water mark (measured under load: benchmarks/serving_load.py)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from fcnseg import serving_io
from fcnseg.serving_io import ForwardCost, Limits, answer_rows, encode_image

MiB = 1024 * 1024


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def answer_in_a_thread(kept: list) -> int:
    """Answers one request in a thread of its own, as MLflow's server does, with a "forward pass" that takes 320 MB
    from malloc in 16 KB blocks and keeps one block in 50 (scattered survivors: the heap cannot shrink from its
    top); returns how much the process's resident memory grew."""
    def segment(image: np.ndarray) -> np.ndarray:
        blocks = [np.ones(2048) for _ in range(20_000)]
        kept.extend(blocks[::50])
        del blocks
        return np.zeros(image.shape[:2], np.uint8)

    request = [encode_image(np.zeros((8, 8, 3), np.uint8))]
    before = rss()
    thread = threading.Thread(target=answer_rows, args=(request, segment, ["a"], ForwardCost(4, 1), Limits()))
    thread.start()
    thread.join()
    return rss() - before


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_memory_a_forward_pass_freed_goes_back_to_the_system(monkeypatch):
    kept: list = []
    assert answer_in_a_thread(kept) < 40 * MiB  # 6.4 MB of survivors; the rest given back
    monkeypatch.setattr(serving_io, "release_freed_memory", lambda: None)  # the same without the trim: kept
    assert answer_in_a_thread(kept) > 200 * MiB, "glibc gave the memory back by itself: this test shows nothing"
