"""The optional C accelerator for RETR (worker/_wirestuff.c); everything else is in pyproject.toml.

``optional=True``: a machine without a C compiler or Python's headers still installs, and
worker/wire.py then serves with its pure-Python stuffer (slower, same bytes).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("worker._wirestuff", ["worker/_wirestuff.c"], optional=True,
                             extra_compile_args=["-O2"])])
