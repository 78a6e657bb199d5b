"""The one compiled part of the project: region-of-interest JPEG decoding against the system's libjpeg-turbo
(headers from Debian's libjpeg-dev; Makefile: APT_PACKAGES). Everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

# optional: without a compiler or libjpeg-dev the package still installs, and decodes JPEGs through PIL (with a
# notice; loaders/image_decode.py)
setup(ext_modules=[Extension("fastimagenet.loaders._jpeg_roi", ["loaders/_jpeg_roi.c"], libraries=["jpeg"],
                             extra_compile_args=["-O2"], optional=True)])
