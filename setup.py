"""Build script: the optional C accelerator (metadata is in setup.cfg).

Without a C compiler the build goes on without it, and l2_stores runs on
its pure-Python paths (see l2_stores/engine/accel.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "l2_stores.engine._accel",
            ["l2_stores/engine/_accel.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        )
    ]
)
