"""Builds the one C extension, ``gotcha_async._meter``, from every ``.c`` file of ``src/_meter/``.

Everything else about the project is in ``pyproject.toml``. Compiler flags are chosen here,
once the compiler is known, because MSVC and the GCC-style compilers (gcc, clang, mingw)
spell them differently and reject each other's.

``GOTCHA_UNCHECKED=1`` builds the extension as it is built for a CPython whose private
layouts it was not checked on (no frames read: no interrupts, refusals or allocation
sites): CI runs the suite against such a build, so that the degraded path keeps working.

``GOTCHA_STRICT=1`` turns warnings into errors (``-Wall -Wextra -Werror``, or ``/W4 /WX``):
CI builds that way with gcc and clang, so a new warning fails there instead of scrolling by
in a user's install. Two ``-Wextra`` warnings are left out, as CPython's own build leaves
them out (``sysconfig.get_config_var("CONFIGURE_CFLAGS_NODIST")``): unused parameters, which
every ``METH_NOARGS`` function has, and missing field initializers, which every
``{NULL}`` sentinel of a method or getset table is.
"""

from __future__ import annotations

import os
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# the extension's C, beside the package and not in it: an sdist carries it (MANIFEST.in),
# a wheel only the compiled module
SOURCE_DIR = "src/_meter"

# hidden: only PyInit__meter (PyMODINIT_FUNC) is exported, whatever the other files declare
GCC_FLAGS = ["-std=c11", "-Wall", "-Wno-missing-braces", "-fvisibility=hidden"]
GCC_STRICT = ["-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers", "-Werror"]
MSVC_FLAGS = ["/std:c11"]
MSVC_STRICT = ["/W4", "/wd4100", "/WX"]  # C4100: the unused parameter, as above


def strict() -> bool:
    return os.environ.get("GOTCHA_STRICT", "") not in ("", "0")


def unchecked() -> bool:
    return os.environ.get("GOTCHA_UNCHECKED", "") not in ("", "0")


class BuildExt(build_ext):
    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "msvc":
            flags = MSVC_FLAGS + (MSVC_STRICT if strict() else [])
        else:
            flags = GCC_FLAGS + (GCC_STRICT if strict() else [])
        for ext in self.extensions:
            ext.extra_compile_args = flags + ext.extra_compile_args
        super().build_extensions()


# sorted: the same object order, hence the same binary, on every machine
SOURCES = sorted(glob(f"{SOURCE_DIR}/*.c"))
if not SOURCES:
    raise SystemExit(f"no C sources in {SOURCE_DIR}/: run the build from the project's root")

setup(
    ext_modules=[
        Extension(
            "gotcha_async._meter",
            sources=SOURCES,
            # a changed header rebuilds every file, as none says which headers it includes
            depends=sorted(glob(f"{SOURCE_DIR}/*.h")),
            define_macros=[("GOTCHA_UNCHECKED", "1")] if unchecked() else [],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
