"""The loops of the four methods, written once for every module.

:mod:`~scvi_onnx.methods.inputs` (AnnData or dataloader to minibatches),
:mod:`~scvi_onnx.methods.engine` (threads, tasks, work sizes), then one loop per method:
:mod:`~scvi_onnx.methods.latent`, :mod:`~scvi_onnx.methods.elbo` (ELBO and reconstruction
error), :mod:`~scvi_onnx.methods.marginal_ll`.
"""
