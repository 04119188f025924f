from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gotcha_async._meter",
            sources=["src/gotcha_async/_meter.c"],
            extra_compile_args=["-std=c11", "-Wall", "-Wno-missing-braces"],
        )
    ]
)
