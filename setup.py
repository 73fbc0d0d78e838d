"""Builds the optional C speed-up; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("slimta.smtp._speedups", ["src/slimta/smtp/_speedups.c"], optional=True),
    ],
)
