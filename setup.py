"""semppl_jax: SemPPL pretraining (semi-supervised contrastive learning) in JAX/Haiku."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
REQUIREMENTS = [
    line.split("#")[0].strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip() and not line.startswith(("pytest", "execnet", "ruff"))
]

setup(
    name="semppl_jax",
    version="0.1.0",
    description="SemPPL: semantic positives via pseudo-labels, pretraining in JAX/Haiku",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["semppl_jax", "semppl_jax.*", "experiments"]),
    install_requires=REQUIREMENTS,
    entry_points={"console_scripts": ["semppl-train = semppl_jax.main:run"]},
    license="Apache-2.0",
)
