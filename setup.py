# Why this file exists: cffi's `cffi_modules` hook and the preload library are setup() keywords.
# Everything else lives in pyproject.toml.
from setuptools import Extension, setup

# uvmbus._preload: the LD_PRELOAD library of `uvmbus sim exec` (native/preload/). Built as an
# ordinary shared object next to uvmbus._native; it is never imported, only preloaded.
preload = Extension(
    "uvmbus._preload",
    sources=["native/preload/uvmbus_preload.c"],
    libraries=["dl", "pthread"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fvisibility=default"],
)

setup(cffi_modules=["native/build.py:ffibuilder"], ext_modules=[preload])
