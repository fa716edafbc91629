"""``optcompile compile | show | list | cache``: the compiler from the shell.

Spec errors print as ``file:line: message`` without a traceback and exit with status 1.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _specs(args) -> list[Path]:
    from .paths import builtin_specs
    paths = [Path(p) for p in args.specs]
    if getattr(args, "all", False):
        paths += builtin_specs()
    if not paths:
        raise SystemExit("optcompile: give spec files, or --all for the built-in specs")
    return paths


def cmd_compile(args) -> int:
    from .cache import atomic_write
    from .compiler import as_spec, generate_sources
    from .loader import CompileReport, compile_to_cache
    total = time.perf_counter()
    for path in _specs(args):
        t0 = time.perf_counter()
        if args.out:
            spec = as_spec(path)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            written = []
            for suffix, text in generate_sources(spec).items():
                target = out / f"{path.stem}{suffix}"
                changed = not target.exists() or target.read_text(encoding="utf-8") != text
                if changed:  # write_if_different: keep mtimes and git status quiet
                    atomic_write(target, text.encode())
                written.append(f"{target} ({'written' if changed else 'unchanged'})")
            print(f"compiled {path} ({spec.name}) in {time.perf_counter() - t0:.2f}s -> " + ", ".join(written))
        else:
            report = CompileReport()
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
    from .compiler import as_spec, build_program, generate_sources
    spec = as_spec(args.spec)
    if args.ir or args.after:
        print(build_program(spec, until=args.after).dump(), end="")
        return 0
    sources = generate_sources(spec)
    suffix = {"eager": ".py", "foreach": ".py", "module": ".py", "triton": "_triton.py", "fused": "_fused.c",
              "c": "_fused.c"}[args.backend]
    if suffix not in sources:
        print(f"optcompile: backend {args.backend!r} is not available in this build", file=sys.stderr)
        return 1
    text = sources[suffix]
    if args.backend in ("eager", "foreach"):
        text = _function(text, f"_single_tensor_{spec.functional}" if args.backend == "eager"
                         else f"_foreach_{spec.functional}", host=f"_{spec.functional}_host")
    print(text, end="")
    return 0


def _function(module_text: str, name: str, host: str) -> str:
    """The host-scalar function and one backend function out of a generated module."""
    out = []
    for fn in (host, name):
        lines = module_text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(f"def {fn}("))
        end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
        out.append("\n".join(lines[start:end]).rstrip() + "\n")
    return "\n\n".join(out)


def cmd_list(args) -> int:
    from .paths import builtin_specs
    from .spec import load_spec
    for path in builtin_specs():
        spec = load_spec(path)
        lines = len(path.read_text().splitlines())
        summary = (spec.doc or "").splitlines()[0] if spec.doc else ""
        print(f"{spec.name:<12} {path.name:<16} {lines:>3} lines  {summary}")
    return 0


def cmd_cache(args) -> int:
    from . import cache
    if args.action == "clear":
        print(f"removed {cache.clear()} files from {cache.root()}")
    else:
        for k, v in cache.info().items():
            print(f"{k}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optcompile", description="Compile optimizer specs to PyTorch code.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile specs (into the cache, or --out DIR)")
    c.add_argument("specs", nargs="*")
    c.add_argument("--all", action="store_true", help="every built-in spec")
    c.add_argument("--out", help="write the generated files here instead of the cache")
    c.set_defaults(func=cmd_compile)
    s = sub.add_parser("show", help="print generated code or IR for a spec")
    s.add_argument("spec")
    s.add_argument("--backend", default="module", choices=["module", "eager", "foreach", "triton", "fused", "c"])
    s.add_argument("--ir", action="store_true", help="print the IR after all passes")
    s.add_argument("--after", help="print the IR after this pass (e.g. add_weight_decay)")
    s.set_defaults(func=cmd_show)
    sub.add_parser("list", help="list the built-in specs").set_defaults(func=cmd_list)
    k = sub.add_parser("cache", help="inspect or clear the cache")
    k.add_argument("action", choices=["info", "clear"])
    k.set_defaults(func=cmd_cache)
    args = parser.parse_args(argv)
    from .cache import JITDisabledError
    from .spec import SpecError
    try:
        return args.func(args)
    except (SpecError, JITDisabledError) as exc:
        print(f"optcompile: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
