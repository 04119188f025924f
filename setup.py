from glob import glob

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gotcha_async._meter",
            sources=sorted(glob("src/gotcha_async/*.c")),
            depends=["src/gotcha_async/_meter.h"],
            extra_compile_args=["-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        )
    ]
)
