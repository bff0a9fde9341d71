"""Package discovery that pyproject.toml alone cannot express.

``kernels/`` is installed as ``fastmerge.kernels`` (the ``package-dir`` mapping in pyproject.toml).
setuptools' ``packages.find`` finds packages under their directory names, so it would ship the
folder as a top-level ``kernels`` package; here every package under ``fastmerge/`` and ``kernels/``
is found and the kernels' get the ``fastmerge.kernels`` prefix, so a new subpackage ships without
anyone listing it. Everything else (metadata, dependencies, package data) is in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

packages = ["fastmerge", *(f"fastmerge.{p}" for p in find_packages(ROOT / "fastmerge"))]
packages += ["fastmerge.kernels", *(f"fastmerge.kernels.{p}" for p in find_packages(ROOT / "kernels"))]

setup(packages=packages)
