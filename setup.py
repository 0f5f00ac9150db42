"""The optional compiled likelihood kernel; everything else is in pyproject.toml.

``runtime/maths/_kernels.c`` (the NB / ZINB likelihood in one pass) is a plain C library that
the runtime opens with ctypes (no Python or numpy headers). ``optional=True``: without a C
compiler the install goes on and the runtime uses numpy's kernel (``scvi_onnx.maths.native``).
``-ffp-contract=off``: no fused multiply-adds, whose rounding would make the sums' bits depend
on the instruction set.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "scvi_onnx.maths._kernels",
            sources=["runtime/maths/_kernels.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        )
    ]
)
