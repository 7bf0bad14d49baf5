"""Build script: packages plus the Cython extensions of the CRDT merge core.

Every ``p2pcloud/_core/*.pyx`` becomes an extension module. A compile failure is
an error: the build stops instead of quietly shipping only the pure-Python twin.
Set ``P2PCLOUD_PUREPYTHON=1`` at build time to skip the extensions on a platform
without a C compiler; the package then runs the reference twin and
``p2pcloud.core_implementation()`` says so.
"""

import glob
import os

from setuptools import find_packages, setup

PURE = os.environ.get("P2PCLOUD_PUREPYTHON", "") == "1"


def core_extensions() -> list:
    if PURE:
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    sources = sorted(glob.glob(os.path.join("p2pcloud", "_core", "*.pyx")))
    extensions = [
        Extension(
            "p2pcloud._core." + os.path.splitext(os.path.basename(src))[0],
            [src],
            extra_compile_args=["-O3"],
        )
        for src in sources
    ]
    return cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )


setup(
    packages=find_packages(include=["p2pcloud", "p2pcloud.*"]) + ["p2pcloudd"],
    package_dir={"p2pcloudd": "daemon/p2pcloudd"},
    package_data={"p2pcloud._core": ["*.pyx", "*.pxd"], "p2pcloudd": ["static/*"]},
    ext_modules=core_extensions(),
    zip_safe=False,
)
