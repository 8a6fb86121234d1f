"""Build script: the optional C extensions (metadata is in setup.cfg).

Without a C compiler the build goes on without them, and l2_stores runs on
its pure-Python paths (see l2_stores/engine/accel.py).
"""

from setuptools import Extension, setup

COMPILE_ARGS = ["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]
# The engine's C files (l2_stores/engine/csrc): what both extensions share (the CRC-32,
# writing through a map), then each extension's own.
CSRC = "l2_stores/engine/csrc/"
SHARED_SOURCES = [CSRC + "crc32.c", CSRC + "mapping.c"]
ACCEL_SOURCES = [
    CSRC + name
    for name in (
        "accel_module.c",
        "framing.c",
        "log_writer.c",
        "values_tail.c",
        "lru_cache.c",
        "container_decoder.c",
        "files.c",
    )
]
ACCEL_HEADERS = [
    CSRC + name for name in ("accel.h", "crc32.h", "format.h", "internal.h", "mapping.h")
]
RUNS_SOURCES = [
    CSRC + name
    for name in ("module.c", "run_lookup.c", "run_writer.c", "run_cursor.c", "filter.c", "layers.c")
]
RUNS_HEADERS = [
    CSRC + name
    for name in (
        "crc32.h",
        "format.h",
        "internal.h",
        "filter.h",
        "run_lookup.h",
        "run_writer.h",
        "run_cursor.h",
        "layers.h",
        "mapping.h",
    )
]

setup(
    ext_modules=[
        Extension(
            "l2_stores.engine._accel",
            [*ACCEL_SOURCES, *SHARED_SOURCES],
            depends=ACCEL_HEADERS,
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
            [*RUNS_SOURCES, *SHARED_SOURCES],
            depends=RUNS_HEADERS,
            optional=True,
            extra_compile_args=COMPILE_ARGS,
        ),
    ]
)
