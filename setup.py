"""Build the optional C kernel. Everything else is in pyproject.toml.

The extension is optional: without a C compiler expo_dist installs and uses its torch kernel,
which gives the same bytes, only slower."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "expo_dist.runtime._ckernel",
            ["expo_dist/runtime/_ckernel.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-std=c99"],
            optional=True,
        )
    ]
)
