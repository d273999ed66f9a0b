# The only reason this file exists: cffi's `cffi_modules` hook is a setup() keyword.
# Everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
