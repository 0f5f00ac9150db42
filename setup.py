"""The optional compiled likelihood kernel; everything else is in pyproject.toml.

``runtime/maths/_kernels.c`` (the NB / ZINB likelihood in one pass) is a plain C library that
the runtime opens with ctypes (no Python or numpy headers). ``optional=True``: without a C
compiler the install goes on and the runtime uses numpy's kernel (``scvi_onnx.maths.native``).
No fused multiply-adds (``-ffp-contract=off``; MSVC's ``/fp:precise`` makes none), whose
rounding would make the sums' bits depend on the instruction set.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FLAGS = {
    "msvc": ["/O2", "/fp:precise"],
    "other": ["-O3", "-ffp-contract=off", "-fno-math-errno"],
}


class BuildKernels(build_ext):
    """Builds the library with its compiler's flags, and exports its C functions (which
    ``_kernels.c`` marks for Windows), not the ``PyInit__kernels`` setuptools asks a Python
    extension for: the library has none, and MSVC's linker fails on a missing export."""

    def build_extension(self, ext):
        kind = "msvc" if self.compiler.compiler_type == "msvc" else "other"
        ext.extra_compile_args = FLAGS[kind]
        super().build_extension(ext)

    def get_export_symbols(self, ext):
        return []


setup(
    ext_modules=[
        Extension("scvi_onnx.maths._kernels", sources=["runtime/maths/_kernels.c"], optional=True)
    ],
    cmdclass={"build_ext": BuildKernels},
)
