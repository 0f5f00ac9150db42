"""``ordered_map``: results in order, bounded work in flight, and items let go once handed on
(a task holds a minibatch's buffers through its views: an item kept by the map keeps them)."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from scvi_onnx.threads import ordered_map


class Item:
    def __init__(self, i: int):
        self.i = i


@pytest.mark.parametrize("threads", [0, 1, 2, 3])
def test_results_in_order(threads):
    assert list(ordered_map(lambda x: x * x, range(20), threads, "t")) == [i * i for i in range(20)]
    assert list(ordered_map(lambda x: x, [], threads, "t")) == []
    assert list(ordered_map(lambda x: x + 1, [41], threads, "t")) == [42]


@pytest.mark.parametrize("threads", [1, 2])
def test_items_are_let_go_once_handed_on(threads):
    refs = []

    def items():
        for i in range(8):
            item = Item(i)
            refs.append(weakref.ref(item))
            yield item

    got = []
    for r in ordered_map(lambda item: item.i, items(), threads, "t"):
        got.append(r)
        if len(got) == 6:
            gc.collect()
            # the first items were computed and their results yielded: nothing holds them
            assert [ref() is None for ref in refs[:4]] == [True] * 4
    assert got == list(range(8))


def test_at_most_threads_plus_one_ahead():
    pulled = []
    gate = threading.Event()

    def items():
        for i in range(10):
            pulled.append(i)
            yield i

    def fn(i):
        if i == 0:
            gate.wait(5)
        return i

    it = ordered_map(fn, items(), 2, "t")
    threading.Timer(0.2, gate.set).start()
    assert next(it) == 0
    assert len(pulled) <= 3  # item 0 plus at most 2 more while it ran
    assert list(it) == list(range(1, 10))


def test_an_error_surfaces_at_its_result():
    def fn(i):
        if i == 3:
            raise ValueError("bad item 3")
        return i

    it = ordered_map(fn, range(6), 2, "t")
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3"):
        next(it)
