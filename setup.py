"""Installs ``fastrecloss`` and maps the top-level ``kernels/`` folder to ``fastrecloss.kernels``.

All metadata lives in pyproject.toml; this file only declares the package layout.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["fastrecloss", "fastrecloss.*"]), "fastrecloss.kernels"],
    package_dir={"fastrecloss": "fastrecloss", "fastrecloss.kernels": "kernels"},
)
