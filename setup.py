"""Maps the design card's top-level folders onto the `edgeopt` import namespace.

pyproject.toml holds all metadata; this file only computes the package list, because setuptools
cannot express "folder X is package edgeopt.X, with all its subpackages" declaratively.
"""
from setuptools import find_namespace_packages, setup

FOLDERS = {"sdk": "edgeopt.sdk", "agent": "edgeopt.agent", "dashboard": "edgeopt.dashboard",
           "hardware_profiles": "edgeopt.hardware_profiles"}

packages = []
for folder, name in FOLDERS.items():
    packages.append(name)
    # Namespace discovery also takes the data folders without __init__.py (templates/, static/,
    # migrations/versions/, systemd/, examples/), so a non-editable install carries them.
    packages.extend(f"{name}.{sub}" for sub in find_namespace_packages(folder, exclude=["*__pycache__*"]))

setup(packages=packages, package_dir={name: folder for folder, name in FOLDERS.items()})
