"""Running scvi-tools under the runtime's noise: what parity checks compare per cell under.

The runtime draws its standard normals from a counter-based generator keyed by seed, stream
and cell (:mod:`scvi_onnx.maths.rng`); torch draws its own. To compare the stochastic methods
(``get_elbo``, ``get_reconstruction_error``, ``get_marginal_ll``) per cell rather than within
a spread, scvi-tools is run with torch's standard-normal draws replaced by the runtime's, in
the order its modules make them. The order is the model's (per forward pass: z, then a learned
library, then TOTALVI's protein background or SCANVI's z2); the caller builds it, this module
feeds it. Used by the parity tests and scripts (``fuzz_parity.py``, ``heldout_check.py``); not
by the exporter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np

#: Lightning trainer options of the parity checks' short trainings: on the CPU, quiet, nothing
#: written (``model.train(max_epochs=..., **QUIET_TRAINING)``). TOTALVI's default learning-rate
#: schedule needs a logger: add ``reduce_lr_on_plateau=False`` for it.
QUIET_TRAINING = dict(
    accelerator="cpu",
    enable_progress_bar=False,
    enable_model_summary=False,
    logger=False,
    enable_checkpointing=False,
)


@contextlib.contextmanager
def torch_draws(draws: Sequence[np.ndarray]) -> Iterator[None]:
    """Inside the block, every standard-normal draw of ``torch.distributions`` (what
    ``Normal.rsample`` / ``sample`` scale and shift) is the next array of ``draws``.

    Each array must have the shape torch asks for (an ``AssertionError`` names both), and every
    array must be used by the end of the block: a different draw order or count fails rather
    than comparing numbers made from other noise.
    """
    import torch
    import torch.distributions.normal as tdn

    queue = list(reversed(draws))
    original = tdn._standard_normal

    def fake(shape, dtype, device):
        assert queue, (
            f"torch asked for a draw of shape {tuple(shape)} beyond the {len(draws)} given"
        )
        arr = queue.pop()
        assert tuple(shape) == arr.shape, (tuple(shape), arr.shape)
        return torch.as_tensor(arr, dtype=dtype, device=device)

    tdn._standard_normal = fake
    try:
        yield
        assert not queue, f"{len(queue)} noise draws unused"
    finally:
        tdn._standard_normal = original
