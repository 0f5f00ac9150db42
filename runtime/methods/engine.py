"""How the loops run: worker threads, reader threads, and the size of a unit of work."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ..data import Minibatch
from ..sessions import CUDA
from ..threads import ordered_map

#: scvi-tools' ``settings.batch_size``: the default minibatch, which also groups cells for
#: ``get_marginal_ll(return_mean=True)`` (a mean of per-minibatch means, as in scvi-tools).
DEFAULT_BATCH_SIZE = 128
#: Most cells x features (16 MB of float32) one dense minibatch holds in the per-cell methods
#: (latent space, ELBO, reconstruction error), whose results do not depend on how cells are
#: grouped: a wider model reads fewer cells at a time, and a few minibatches are in flight.
#: PEAKVI on 15,792 regions reads 264 cells (four tasks; not 1,024: 65 MB each), and its
#: ELBO's peak went from 474 to 309 MB; a Census-sized model (8,000 genes) reads 524 (ELBO
#: peak 432 -> 355 MB, its time the same within this machine's noise); 2,000 genes are not
#: cut at 1,024 cells. Never fewer than one task (``MIN_CALL_ROWS`` cells at least).
#: The marginal LL keeps ``batch_size`` (it groups cells: a mean of minibatch means).
READ_ELEMENTS = 1 << 22
#: Upper bound on elements of one (samples x cells x genes) decoder output per session call.
DECODER_CHUNK_ELEMENTS = 1 << 21
#: Cells x genes of one unit of work for the per-cell methods: minibatches are split into
#: tasks of at most this many elements (memory; per-cell results do not change). 2^20 against
#: 2^19, medians of 4 alternating calls in one process, 2 threads, 20,000 backed cells: ELBO
#: -9% (PEAKVI 2,000 regions), -11% (SCVI ZINB), -18% (Census-sized), -21% (PEAKVI 15,792
#: regions), the latent space -3% to -18%: fewer ONNX Runtime calls and numpy calls per cell;
#: peak memory +10-25 MB. 2^21 was faster still, but PBMC ZINB's ELBO peak went 288 -> 370 MB.
TASK_ELEMENTS = 1 << 20
#: Fewest cells (or sample x cell rows) one ONNX Runtime call carries, whatever the bounds
#: above say: each call reads the graph's weights from memory once, and a wide model's do not
#: stay in cache (PEAKVI on 100,000 regions: 126 MB per graph, n_hidden sqrt(R) = 316). A row
#: is ~2 x weights FLOPs against 4 x weights bytes read per call, so at ~100 GFLOP/s and
#: ~10 GB/s per core a call needs tens of rows before its products, not the weight reads, set
#: its time. Measured there (3,000 cells, 2 threads): ELBO 7.6 s with 10 cells per call (2^20
#: elements), 3.6 s with 64 (scvi-tools 9.0 s), 3.3 s with 128 at +250 MB; the marginal LL
#: 4.8 s with 20 rows per decoder call, 3.9 s with 64. Models up to 16,384 features (2^20 /
#: 64) already have at least this many.
MIN_CALL_ROWS = 64
#: The same two bounds on CUDA, where one call must carry enough work to hide its launches.
CUDA_DECODER_CHUNK_ELEMENTS = 1 << 26
CUDA_TASK_ELEMENTS = 1 << 23
#: Most worker threads by default (ONNX Runtime and numpy release the GIL).
MAX_DEFAULT_THREADS = 8


@dataclass(frozen=True)
class Engine:
    """Threads and work sizes for one model on one execution provider.

    Attributes
    ----------
    n_workers
        Worker threads over tasks and Monte-Carlo chunks (1: the calling thread).
    prefetch
        Reader threads that densify and check the next minibatches while the workers compute
        (the scoring methods).
    latent_prefetch
        The same for the latent space and predictions: none on the CPU (a reader thread made
        it a little faster, but its memory grew with the number of cells: one more thread's
        glibc arenas; flat without); on CUDA the host's data path bounds the latent space, so
        the readers run there too.
    task_elements, chunk_elements
        Cells x genes of a per-cell task; elements of one decoder call.
    read_elements
        Most cells x genes of one dense minibatch in the per-cell methods:
        ``READ_ELEMENTS``, and never less than one task (CUDA's tasks are larger).
    """

    n_workers: int
    prefetch: int
    latent_prefetch: int
    task_elements: int
    chunk_elements: int
    read_elements: int

    @classmethod
    def for_provider(cls, provider: str, n_threads: int | None = None) -> Engine:
        n = int(n_threads or min(os.cpu_count() or 1, MAX_DEFAULT_THREADS))
        # the readers prepare the next minibatches while the workers compute (ELBO ~1.5x on
        # 2 CPUs over 1M backed cells)
        prefetch = max(1, n // 2) if n > 1 else 0
        cuda = provider == CUDA
        task = CUDA_TASK_ELEMENTS if cuda else TASK_ELEMENTS
        return cls(
            n_workers=n,
            prefetch=prefetch,
            latent_prefetch=prefetch if cuda else 0,
            task_elements=task,
            chunk_elements=CUDA_DECODER_CHUNK_ELEMENTS if cuda else DECODER_CHUNK_ELEMENTS,
            read_elements=max(READ_ELEMENTS, task),
        )

    def pmap(self, fn: Callable, items: Iterable) -> Iterator:
        """``map(fn, items)`` on the worker threads, in order, with bounded work in flight."""
        return ordered_map(fn, items, self.n_workers if self.n_workers > 1 else 0, "scvi-onnx")

    def task_cells(self, n_features: int, min_rows: int | None = None) -> int:
        """Cells of one per-cell task: ``task_elements`` cells x features, at least
        ``min_rows`` (default ``MIN_CALL_ROWS``)."""
        return max(min_rows or MIN_CALL_ROWS, self.task_elements // max(1, n_features))

    def read_cells(self, n_features: int, min_rows: int | None = None) -> int:
        """Most cells of one dense minibatch in the per-cell methods: ``read_elements``
        cells x features, a whole number of tasks (at least one)."""
        task = self.task_cells(n_features, min_rows)
        return task * max(1, self.read_elements // max(1, n_features) // task)

    def tasks(
        self, mbs: Iterable[Minibatch], n_features: int, min_rows: int | None = None
    ) -> Iterator[Minibatch]:
        """Split minibatches into tasks of at most :meth:`task_cells` cells."""
        step = self.task_cells(n_features, min_rows)
        for mb in mbs:
            n = mb.n
            if n <= step:
                yield mb
                continue
            for start in range(0, n, step):
                yield mb.rows(slice(start, start + step))
            del mb  # not held while the next minibatch is read (its tasks hold what they need)
