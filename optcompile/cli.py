"""``optcompile compile | show | list | cache``: the compiler from the shell.

Errors (a spec's, a file's, the cache's) print as one line, ``optcompile: error: file:line: message``,
without a traceback, and exit with status 1. As a program, the CLI runs its work in a child process
and exits non-zero unless that child finished: a spec that ends the process itself (``os._exit``,
a signal) cannot make a compile that never happened look like a success.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_STATUS_FD = "_OPTCOMPILE_CLI_STATUS_FD"  # set by the supervising parent in the child's environment
_status_fd: int | None = None  # the child's end of the status pipe


class CLIError(Exception):
    """A problem the user can fix (a path, a pass name); printed as one line."""


def _status(line: str) -> None:
    """Tell the supervising parent what the child is doing (``spec PATH``) or that it finished."""
    if _status_fd is not None:
        try:
            os.write(_status_fd, (line + "\n").encode("utf-8", "replace"))
        except OSError:
            pass


def _spec_output():
    """While a spec file runs: what it prints goes to stderr, so stdout stays the command's output
    (``optcompile show spec.py > step.py`` is the generated code, nothing else)."""
    return contextlib.redirect_stdout(sys.stderr)


def _specs(args) -> list[Path]:
    from .paths import builtin_specs
    paths = [Path(p) for p in args.specs]
    if getattr(args, "all", False):
        paths += builtin_specs()
    if not paths:
        raise CLIError("give spec files, or --all for the built-in specs")
    return paths


def cmd_compile(args) -> int:
    from .cache import atomic_write
    from .compiler import as_spec, generate_sources
    from .loader import CompileReport, compile_to_cache
    total = time.perf_counter()
    for path in _specs(args):
        t0 = time.perf_counter()
        _status(f"spec {path}")
        if args.out:
            with _spec_output():
                spec = as_spec(path)
            out = Path(args.out)
            written = []
            for suffix, text in generate_sources(spec).items():
                target = out / f"{path.stem}{suffix}"
                try:
                    out.mkdir(parents=True, exist_ok=True)
                    changed = not target.is_file() or target.read_bytes() != text.encode()
                    if changed:  # write_if_different: keep mtimes and git status quiet
                        atomic_write(target, text.encode())
                except OSError as exc:
                    raise CLIError(f"cannot write {exc.filename or target} (--out {out}): "
                                   f"{exc.strerror or exc}") from None
                written.append(f"{target} ({'written' if changed else 'unchanged'})")
            print(f"compiled {path} ({spec.name}) in {time.perf_counter() - t0:.2f}s -> " + ", ".join(written))
        else:
            report = CompileReport()
            with _spec_output():
                compile_to_cache(path, report)
            hits = sum(hit for _, hit in report.files)
            state = "cache hit" if hits == len(report.files) else f"cache miss ({len(report.files) - hits} built)"
            print(f"compiled {path} in {report.seconds:.2f}s, {state}:")
            for f, hit in report.files:
                print(f"  {f}{'  (hit)' if hit else ''}")
    if len(args.specs) > 1 or args.all:
        print(f"total {time.perf_counter() - total:.2f}s")
    return 0


def cmd_show(args) -> int:
    from .backends.registry import MODULE_SUFFIX
    from .compiler import as_spec, backend_source, build_program, generate_sources
    if args.after is not None:
        from .passes import PASS_NAMES
        if args.after not in PASS_NAMES:
            raise CLIError(f"--after {args.after!r}: no such pass; the passes are {', '.join(PASS_NAMES)}")
    _status(f"spec {args.spec}")
    with _spec_output():
        spec = as_spec(args.spec)
    if args.ir or args.after:
        print(build_program(spec, until=args.after).dump(), end="")
        return 0
    if args.plan:
        from .kernel_plan import build
        print(build(build_program(spec)).dump(), end="")
        return 0
    if args.state_precision is not None and args.backend not in ("fused", "triton"):
        raise CLIError("--state-precision specializes the kernels: use it with --backend fused or --backend triton")
    text = generate_sources(spec)[MODULE_SUFFIX] if args.backend == "module" else \
        backend_source(spec, args.backend, args.state_precision)
    print(text, end="")
    return 0


def cmd_list(args) -> int:
    from .paths import builtin_specs
    from .spec import load_spec
    for path in builtin_specs():
        _status(f"spec {path}")
        with _spec_output():
            spec = load_spec(path)
        lines = len(path.read_text().splitlines())
        summary = (spec.doc or "").splitlines()[0] if spec.doc else ""
        print(f"{spec.name:<12} {path.name:<16} {lines:>3} lines  {summary}")
    return 0


def cmd_cache(args) -> int:
    from . import cache
    if args.action == "clear":
        print(f"removed {cache.clear()} entries from {cache.root()}")
    else:
        for k, v in cache.info().items():
            print(f"{k}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The CLI. Called as the program (no ``argv``), it supervises a child that does the work."""
    global _status_fd
    fd = os.environ.pop(_STATUS_FD, None)
    if argv is None and fd is None and os.name == "posix":
        return _supervise(sys.argv[1:])
    if fd is not None and fd.isdigit():
        _status_fd = int(fd)
    code = _main(argv)
    _status("done")
    return code


def _supervise(args: list[str]) -> int:
    """Run ``python -m optcompile ARGS`` with a status pipe; its exit status is ours, except that a
    child that never reported "done" (a spec called ``os._exit``, a signal) is an error."""
    r, w = os.pipe()
    try:
        child = subprocess.Popen([sys.executable, "-m", "optcompile", *args], pass_fds=(w,),
                                 env={**os.environ, _STATUS_FD: str(w)})
    finally:
        os.close(w)
    forward = lambda sig, _frame: child.send_signal(sig)  # noqa: E731
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child (same process group)
    with os.fdopen(r, "rb") as f:
        lines = f.read().decode("utf-8", "replace").splitlines()
    rc = child.wait()
    if lines and lines[-1] == "done":
        return rc if rc >= 0 else 128 - rc
    how = f"was killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
    doing = lines[-1][5:] if lines and lines[-1].startswith("spec ") else None
    where = f"{doing}: the process {how} while loading or compiling it" if doing else \
        f"the process {how} before finishing"
    hint = " (the spec called os._exit()?)" if rc == 0 else ""
    print(f"optcompile: error: {where}{hint}; nothing after it was done", file=sys.stderr)
    return rc if rc > 0 else (128 - rc if rc < 0 else 1)


def _main(argv: list[str] | None) -> int:
    from .backends.registry import BACKENDS
    parser = argparse.ArgumentParser(prog="optcompile", description="Compile optimizer specs to PyTorch code.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile specs (into the cache, or --out DIR)")
    c.add_argument("specs", nargs="*")
    c.add_argument("--all", action="store_true", help="every built-in spec")
    c.add_argument("--out", help="write the generated files here instead of the cache")
    c.set_defaults(func=cmd_compile)
    s = sub.add_parser("show", help="print generated code or IR for a spec")
    s.add_argument("spec")
    s.add_argument("--backend", default="module", choices=["module", *(n for b in BACKENDS for n in (b.name, *b.aliases))],
                   help="the whole Python module (default), or one backend's step: the eager or foreach "
                        "function, the Triton module, the fused C file")
    s.add_argument("--ir", action="store_true", help="print the IR after all passes")
    s.add_argument("--after", help="print the IR after this pass (e.g. add_weight_decay)")
    s.add_argument("--plan", action="store_true", help="print the kernel plan the Triton and C kernels are printed from")
    s.add_argument("--state-precision", choices=["fp32", "bf16", "fp16", "8bit"],
                   help="with --backend fused or triton: the kernel specialized for every state stored so (the "
                        "C build's defines, the Triton launch's dtypes; 8bit: int8/uint8 codes)")
    s.set_defaults(func=cmd_show)
    sub.add_parser("list", help="list the built-in specs").set_defaults(func=cmd_list)
    k = sub.add_parser("cache", help="inspect or clear the cache")
    k.add_argument("action", choices=["info", "clear"])
    k.set_defaults(func=cmd_cache)
    try:
        args = parser.parse_args(argv)
    except SystemExit:  # --help (0) or a usage error (2): argparse has said what it had to
        _status("done")
        raise
    from .cache import JITDisabledError, UnsafeCacheError
    from .spec import SpecError
    try:
        return args.func(args)
    except (SpecError, JITDisabledError, UnsafeCacheError, CLIError) as exc:
        print(f"optcompile: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the environment's (unreadable file, full disk), never a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"optcompile: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("optcompile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
