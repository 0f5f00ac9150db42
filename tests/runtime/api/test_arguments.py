"""Arguments: batch sizes, Monte-Carlo sample counts and seeds are checked once, the same way
by every method and by ``load``."""

from __future__ import annotations

import numpy as np
import pytest

import scvi_onnx
from scvi_onnx.errors import InvalidArgumentError

from ...conftest import SHIPPED_BUNDLE
from ..helpers import all_methods, raises


@pytest.mark.parametrize(
    "kwargs",
    [dict(batch_size=0), dict(batch_size=-3), dict(n_mc_samples=0), dict(n_mc_samples=-1)],
)
def test_bad_arguments(model, query, kwargs):
    with pytest.raises(InvalidArgumentError):
        model.get_marginal_ll(query, **kwargs)


@pytest.mark.parametrize("seed", [1.5, "3", True])
def test_seed_must_be_an_integer(model, query, seed):
    with pytest.raises(InvalidArgumentError, match="seed"):
        model.get_elbo(query, seed=seed)
    with pytest.raises(InvalidArgumentError, match="seed"):
        scvi_onnx.load(SHIPPED_BUNDLE, device="cpu", seed=seed)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 2**70])
def test_seed_out_of_range_refused(model, query, seed, capsys):
    """Seeds are used modulo 2**64: beyond torch's range [-2**63, 2**64) two seeds would give
    the same draws (2**64 was seed 0), so they are refused, in the API and the CLI."""
    from scvi_onnx.cli import main

    with pytest.raises(InvalidArgumentError, match=r"seed must be in \[-2\*\*63"):
        model.get_elbo(query, seed=seed)
    assert main(["elbo", str(SHIPPED_BUNDLE), "x.h5ad", "--seed", str(seed)]) == 2
    assert "seed must be in [-2**63" in capsys.readouterr().err
    # the range's ends are seeds, and a negative seed is itself plus 2**64 (as in torch)
    sub = query[:20]
    top = model.get_elbo(sub, seed=2**64 - 1, return_mean=False)
    np.testing.assert_array_equal(model.get_elbo(sub, seed=-1, return_mean=False), top)
    assert np.isfinite(model.get_elbo(sub, seed=-(2**63)))


@pytest.mark.parametrize("first_key", [-1, 2**62, 2**70])
def test_first_key_out_of_range_refused(model, query, first_key):
    """A cell key that cannot be an int64 row key is refused (2**70: numpy's OverflowError,
    a server's 500)."""
    with pytest.raises(InvalidArgumentError, match=r"first_key must be an integer in \[0, 2\*\*62"):
        model.get_elbo(query[:5], first_key=first_key)
    assert np.isfinite(model.get_elbo(query[:5], first_key=2**62 - 1))


def test_seed_none_is_the_models_seed(model, query):
    # seed=None (the default) draws with the model's seed, given explicitly or at load; the
    # comparison with another seed shows the seed reaches the draws at all
    assert model.seed == 0
    default = model.get_elbo(query, seed=None, return_mean=False)
    np.testing.assert_array_equal(default, model.get_elbo(query, return_mean=False))
    np.testing.assert_array_equal(default, model.get_elbo(query, seed=0, return_mean=False))
    assert not np.array_equal(default, model.get_elbo(query, seed=1, return_mean=False))
    assert model.get_elbo(query, seed=None) == model.get_elbo(query, seed=model.seed)
    seeded = scvi_onnx.load(SHIPPED_BUNDLE, device="cpu", seed=5)
    np.testing.assert_array_equal(
        seeded.get_elbo(query, return_mean=False), model.get_elbo(query, seed=5, return_mean=False)
    )
    np.testing.assert_array_equal(
        seeded.get_marginal_ll(query[:20], n_mc_samples=5, seed=None, return_mean=False),
        model.get_marginal_ll(query[:20], n_mc_samples=5, seed=5, return_mean=False),
    )


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "8"])
def test_bad_batch_size_and_mc_samples(model, query, value):
    for call in all_methods(model, query, batch_size=value):
        raises(InvalidArgumentError, call, "batch_size", repr(value))
    for kw in ("n_mc_samples", "n_mc_samples_per_pass"):
        raises(
            InvalidArgumentError,
            lambda kw=kw: model.get_marginal_ll(query, **{kw: value}),
            kw,
            repr(value),
        )
