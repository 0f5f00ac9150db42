"""The numpy side of the maths: noise, reference distributions, fast likelihood kernels.

:mod:`~scvi_onnx.maths.rng` (counter-based noise), :mod:`~scvi_onnx.maths.distributions`
(float64 reference formulas of scvi-tools' distributions and KL terms),
:mod:`~scvi_onnx.maths.likelihood` (the fast per-cell kernels of the hot path),
:mod:`~scvi_onnx.maths.dispersion` (which dispersion each cell uses).
"""
