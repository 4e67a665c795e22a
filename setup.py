"""The build of qubesshm: the Python package, the compiled core of the relay's fast path
(``qubesshm.relay._fastpath``, C against the CPython API, no other dependency) and the
protocol definitions in ``protocols/``, which a wheel carries as ``qubesshm/_protocols``
(an editable install reads them where they are).

The core is optional to the build: without a compiler or Python's headers the install
still succeeds, and qubesshm runs its pure-Python fast path, which ``serve``'s start
line names with the reason ("fast path: pure Python (the compiled core is not built:
...)"); the test suite, which needs the core, fails."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent


class BuildPyWithProtocols(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib) / "qubesshm" / "_protocols"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(HERE / "protocols", target,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(
    cmdclass={"build_py": BuildPyWithProtocols},
    ext_modules=[
        Extension(
            "qubesshm.relay._fastpath",
            sources=["qubesshm/relay/_fastpath.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
        ),
    ],
)
