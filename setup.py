"""Build script: the metadata lives in setup.cfg; this only adds the native
code, which cffi compiles from native/ whenever the package is installed."""
import setuptools

setuptools.setup(
    version='0.1.0',
    cffi_modules=['native/vdsk_build.py:ffibuilder'],
)
