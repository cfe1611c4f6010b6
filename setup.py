"""The compiled part of loopwatch: one optional C extension, the request line.

Everything else is in pyproject.toml. Without a C compiler the extension is skipped with
a warning and loopwatch installs as pure Python, which writes the same lines.
"""

import os

from setuptools import Extension, setup

SOURCE = "src/loopwatch/_capture/_speedups.pyx"

extensions = []
if os.path.exists(SOURCE):
    from Cython.Build import cythonize

    extensions = cythonize(
        [Extension("loopwatch._capture._speedups", [SOURCE])],
        compiler_directives={"language_level": "3"},
        build_dir="build/cython",  # the generated C stays out of the package
    )
    for extension in extensions:
        extension.optional = True  # a failed build leaves the pure-Python fallback

setup(ext_modules=extensions)
