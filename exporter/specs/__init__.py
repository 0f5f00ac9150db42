"""One export spec per scvi-tools model class (the runtime's registry names each one).

:mod:`~scvi_onnx.exporter.specs.base` (:class:`ExportSpec`, :class:`GraphExport`),
:mod:`~scvi_onnx.exporter.specs.vae` (SCVI), :mod:`~scvi_onnx.exporter.specs.ldvae`
(LinearSCVI), :mod:`~scvi_onnx.exporter.specs.scanvae` (SCANVI).
"""
