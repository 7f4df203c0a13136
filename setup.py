"""Build fedgen's optional compiled site kernel (fedgen/stats/_glmkernel.c).

Everything else is in pyproject.toml. The kernel is plain C loaded with ctypes; where no C
compiler is available the build skips it (``optional=True``) and the numpy kernel runs.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fedgen.stats._glmkernel",
            sources=["fedgen/stats/_glmkernel.c"],
            # IEEE arithmetic (no -ffast-math): only the sums marked `omp simd reduction` are
            # reassociated, so that they vectorise
            extra_compile_args=["-O3", "-fno-math-errno", "-fopenmp-simd", "-std=c99"],
            optional=True,
        )
    ]
)
