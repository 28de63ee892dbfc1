"""Build script for the Cython extension(s); metadata lives in pyproject.toml.

The fastpath extension is required by default: a build that cannot compile it
fails loudly rather than silently installing the slow pure-Python codec.
Set PIGEON_NO_EXTENSIONS=1 to build a pure-Python install on purpose.

PIGEON_CYTHON_TRACE=1 rebuilds with line tracing and annotated HTML (for
profiling); PIGEON_CYTHON_DEBUG=1 keeps the bounds and wraparound checks that
release builds compile out.
"""

import os

from setuptools import setup


def _extensions():
    if os.environ.get("PIGEON_NO_EXTENSIONS") == "1":
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    trace = os.environ.get("PIGEON_CYTHON_TRACE") == "1"
    debug = os.environ.get("PIGEON_CYTHON_DEBUG") == "1" or trace
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if trace else []
    ext = Extension(
        "pigeon.fastpath._codec",
        ["fastpath/_codec.pyx"],
        define_macros=macros,
        extra_compile_args=["-O2"],
    )
    return cythonize(
        [ext],
        # Generated C goes to build/, never next to the sources or into the wheel.
        build_dir="build/cython",
        annotate=trace,
        compiler_directives={
            "language_level": 3,
            "boundscheck": debug,
            "wraparound": debug,
            "initializedcheck": debug,
            "cdivision": True,
            "linetrace": trace,
            "embedsignature": True,
        },
    )


setup(ext_modules=_extensions())
