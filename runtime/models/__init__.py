"""One module per scvi-tools module: the per-minibatch terms of the four methods.

:mod:`~scvi_onnx.models.base` (the interface), :mod:`~scvi_onnx.models.vae` (``VAE``: SCVI),
:mod:`~scvi_onnx.models.ldvae` (``LDVAE``: LinearSCVI), :mod:`~scvi_onnx.models.scanvae`
(``SCANVAE``: SCANVI), :mod:`~scvi_onnx.models.scoring` (the gene likelihood on the host or in
the scoring graph), :mod:`~scvi_onnx.models.registry` (which model class uses which).
"""
