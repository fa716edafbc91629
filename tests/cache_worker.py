"""A compiling subprocess for tests/test_cache.py: ``cache_worker.py SPEC MODE [BARRIER N]``.

MODE ``plain`` compiles (after all N workers have checked in to the BARRIER folder, so they race);
``slow_build`` hangs inside code generation, ``slow_write`` hangs after the temp file is written
and before it is renamed into place; both touch ``$MARKER`` first so the test knows when to kill.
"""
import os
import sys
import time
from pathlib import Path

from optcompile import cache, compiler, loader


def _hang(*_args, **_kwargs):
    Path(os.environ["MARKER"]).write_text("ready")
    time.sleep(600)


def main() -> None:
    spec, mode = sys.argv[1], sys.argv[2]
    if mode == "slow_build":
        compiler.generate_sources = _hang
    elif mode == "slow_write":
        cache.os.fsync = _hang  # atomic_write: after write and flush, before os.replace
    if len(sys.argv) > 4:
        barrier, n = Path(sys.argv[3]), int(sys.argv[4])
        (barrier / str(os.getpid())).write_text("")
        t0 = time.time()
        while len(list(barrier.iterdir())) < n and time.time() - t0 < 60:
            time.sleep(0.01)
    cls = loader.compile_spec(spec)
    print(f"ok {cls.__name__} {cls._info.module}")


if __name__ == "__main__":
    main()
