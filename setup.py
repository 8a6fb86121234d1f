"""Build script: the optional C accelerator (metadata is in setup.cfg).

Without a C compiler the build goes on without it, and l2_stores runs on
its pure-Python paths (see l2_stores/engine/accel.py).
"""

from setuptools import Extension, setup

COMPILE_ARGS = ["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]

setup(
    ext_modules=[
        Extension(
            "l2_stores.engine._accel",
            ["l2_stores/engine/_accel.c"],
            optional=True,
            extra_compile_args=COMPILE_ARGS,
        ),
        Extension(
            "l2_stores._idle_core",
            ["l2_stores/_idle_core.c"],
            optional=True,
            extra_compile_args=COMPILE_ARGS,
        ),
    ]
)
