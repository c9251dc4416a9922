"""Package discovery for Baton's layout.

The import root `baton.*` lives in several top-level folders: `baton/` (the public facade),
`shared/`, `kernels/` and `services/`. setuptools cannot discover sub-packages under a remapped
folder on its own, so they are listed here; everything else is in pyproject.toml. Never install
top-level packages named `shared`, `kernels` or `services` (transformers probes for `kernels`).
"""

from setuptools import find_packages, setup

PACKAGE_DIRS = {
    "baton": "baton",
    "baton.shared": "shared",
    "baton.kernels": "kernels",
    "baton.services": "services",
}


def _packages() -> list[str]:
    packages = []
    for package, folder in PACKAGE_DIRS.items():
        packages.append(package)
        packages.extend(f"{package}.{sub}" for sub in find_packages(folder))
    return packages


setup(package_dir=PACKAGE_DIRS, packages=_packages())
