"""Build script: the optional C extensions (metadata is in setup.cfg).

Without a C compiler the build goes on without them, and l2_stores runs on
its pure-Python paths (see l2_stores/engine/accel.py).
"""

from setuptools import Extension, setup

COMPILE_ARGS = ["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]
# The C run reader and writer (l2_stores/engine/runs_c), linked with zlib for its crc32.
RUNS_C = "l2_stores/engine/runs_c/"
RUNS_SOURCES = [RUNS_C + name for name in ("module.c", "run_lookup.c", "run_writer.c", "filter.c")]
RUNS_HEADERS = [RUNS_C + name for name in ("format.h", "filter.h", "run_lookup.h", "run_writer.h")]

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
        Extension(
            "l2_stores.engine._runs",
            RUNS_SOURCES,
            depends=RUNS_HEADERS,
            libraries=["z"],
            optional=True,
            extra_compile_args=COMPILE_ARGS,
        ),
    ]
)
