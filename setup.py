"""Build the compiled core ``deltaxfer._core`` from the Cython and C sources under ``ext/``,
and the action script ``deltaxfer/_hook_agent`` from ext/hook/hook_agent.c.

liblz4 and libxxhash are the system's, found with pkg-config (the python-lz4 pattern):
a missing library stops the build with the Debian package to install.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# pkg-config module -> Debian package that provides it
SYSTEM_LIBS = {"liblz4": "liblz4-dev", "libxxhash": "libxxhash-dev"}


def pkg_config(module: str, debian_pkg: str) -> dict:
    if shutil.which("pkg-config") is None:
        sys.exit("deltaxfer build: pkg-config not found; install it: apt-get install pkg-config")
    try:
        cflags = subprocess.check_output(["pkg-config", "--cflags", module], text=True,
                                         stderr=subprocess.PIPE).split()
        libs = subprocess.check_output(["pkg-config", "--libs", module], text=True,
                                       stderr=subprocess.PIPE).split()
    except subprocess.CalledProcessError:
        sys.exit(f"deltaxfer build: the C library {module} was not found by pkg-config; "
                 f"install it: apt-get install {debian_pkg}")
    return {
        "include_dirs": [f[2:] for f in cflags if f.startswith("-I")],
        "library_dirs": [f[2:] for f in libs if f.startswith("-L")],
        "libraries": [f[2:] for f in libs if f.startswith("-l")],
    }


def core_extension() -> Extension:
    include_dirs, library_dirs, libraries = ["ext", "ext/c"], [], []
    for module, debian_pkg in SYSTEM_LIBS.items():
        found = pkg_config(module, debian_pkg)
        include_dirs += found["include_dirs"]
        library_dirs += found["library_dirs"]
        libraries += found["libraries"]
    return Extension(
        "deltaxfer._core",
        sources=["ext/_core.pyx"] + sorted(glob.glob("ext/c/*.c")),
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        libraries=libraries,
        extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wno-unused-function",
                            "-fno-strict-aliasing"],
    )


def ext_modules():
    from Cython.Build import cythonize

    return cythonize(
        [core_extension()],
        include_path=["ext"],
        compiler_directives={"language_level": "3", "boundscheck": False,
                             "wraparound": False, "cdivision": True},
        annotate=bool(os.environ.get("DELTAXFER_ANNOTATE")),
    )


class build_ext_and_hook(build_ext):
    """The extension, then the action script `deltaxfer/_hook_agent` (ext/hook/hook_agent.c,
    a plain executable with the same compiler) beside it: CRIU runs it inside the freeze,
    where a Python interpreter's start costs ~20 ms."""

    def run(self):
        super().run()
        out_dir = os.path.dirname(self.get_ext_fullpath("deltaxfer._core"))
        obj = self.compiler.compile(["ext/hook/hook_agent.c"], output_dir=self.build_temp,
                                    extra_postargs=["-O2", "-std=gnu11", "-Wall"])
        self.compiler.link_executable(obj, "_hook_agent", output_dir=out_dir)


setup(ext_modules=ext_modules(), cmdclass={"build_ext": build_ext_and_hook})
