"""pilot's one C extension, ``pilot._launch`` (native/launch.c); the rest of the package is
described in pyproject.toml. The extension is optional: where it cannot be built, tasks start
through ``os.posix_spawn`` (see pilot/spawn.py)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pilot._launch", ["native/launch.c", "native/lane.c"], depends=["native/launch.h"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra"])])
