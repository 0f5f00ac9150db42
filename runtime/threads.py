"""``map`` on worker threads: results in order, a bounded number of items in flight."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain

_END = object()


def ordered_map(fn: Callable, items: Iterable, threads: int, name: str) -> Iterator:
    """``map(fn, items)`` with ``threads`` worker threads (0: on the calling thread).

    Items are pulled from ``items`` on the calling thread, at most ``threads + 1`` ahead of
    the result being yielded. An exception raised by ``fn`` surfaces when its result is
    reached, after the earlier results were yielded; closing the generator cancels what has
    not started.
    """
    if threads <= 0:
        yield from map(fn, items)
        return
    it = iter(items)
    first = next(it, _END)
    if first is _END:
        return
    second = next(it, _END)
    if second is _END:
        # one item (a small call: a few cells): no pool to start and join, ~0.3 ms saved
        yield fn(first)
        return
    # the chain holds the first two items only until they are submitted: names bound to them
    # here would pin them (a minibatch's buffers, through a task's views) for the whole run
    items = chain((first, second), it)
    del first, second
    with ThreadPoolExecutor(threads, thread_name_prefix=name) as ex:
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(ex.submit(fn, item))
                if len(pending) > threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
