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


@contextlib.contextmanager
def float64_protein_likelihood() -> Iterator[None]:
    """Inside the block, scvi-tools' ``NegativeBinomialMixture.log_prob`` (TOTALVI's protein
    likelihood) computes in float64 on its float32 parameters: the exact value of the
    likelihood over what its float32 decoder gave.

    The runtime computes the protein likelihood in float64; torch's float32 is itself up to
    ~1e-4 relative per cell from this value on trained models (protein counts in the hundreds:
    its ``lgamma`` count terms and ``theta * log`` terms round), so a per-cell comparison at a
    tighter tolerance compares with this.
    """
    import copy

    from scvi.distributions import NegativeBinomialMixture

    original = NegativeBinomialMixture.log_prob

    def log_prob(self, value):
        if self.theta2 is not None:  # TOTALVI has one dispersion per protein
            raise NotImplementedError("a second dispersion (theta2) is not supported here")
        exact = copy.copy(self)
        for name in ("mu1", "mu2", "theta1", "mixture_logits"):
            setattr(exact, name, getattr(self, name).double())
        return original(exact, value.double())

    NegativeBinomialMixture.log_prob = log_prob
    try:
        yield
    finally:
        NegativeBinomialMixture.log_prob = original
