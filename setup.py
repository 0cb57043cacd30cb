"""Which packages the distribution holds; every other piece of metadata is in setup.cfg.

The stage configs live in the top-level `configs/` folder (short paths to read and edit in a checkout) and install
as the subpackage `lavie_jax.configs`, so `pip install lavie-jax` brings them and `--config base:tiny` finds them by
name (lavie_jax.cli.config_flags). Editable installs map the same name onto `configs/`.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["lavie_jax", "lavie_jax.*"]) + ["lavie_jax.configs"],
      package_dir={"lavie_jax.configs": "configs"})
