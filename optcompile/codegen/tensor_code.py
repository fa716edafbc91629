"""IR statements → in-place torch code, shared by the eager and foreach backends.

A statement ``x ← e`` is compiled the way a person writes torch.optim code: when ``e`` is linear
in ``x`` the buffer is updated in place (``lerp_``, ``mul_``, ``add_``, ``addcmul_``,
``addcdiv_``); anything else is built into a fresh temporary with out-of-place ops followed by
in-place ops on that temporary, so each statement allocates at most what it must. The two
backends differ only in how an op is spelled (:class:`Dialect`): ``x.add_(y)`` versus
``torch._foreach_add_(xs, ys)``.
"""
from __future__ import annotations

import itertools

import sympy

from ..ir import TRUE, AxisReduction, Clamp, Program, Reduction, TensorFunction, TensorScalar, satisfiable
from .forms import Forms
from .host import HostPrinter, host_of, pyexpr


class Dialect:
    """How eager code spells an op on one tensor."""

    per_tensor_scalars_are_lists = False

    def new(self, fn: str, *args: str, **kw: str) -> str:
        return f"torch.{fn}({_args(args, kw)})"

    def inplace(self, target: str, fn: str, *args: str, **kw: str) -> str:
        return f"{target}.{fn}_({_args(args, kw)})"

    def copy(self, target: str, src: str) -> str:
        return f"{target}.copy_({src})"

    def clone(self, x: str) -> str:
        return f"{x}.clone()"

    def full(self, value: str, per_tensor: bool = False) -> str:
        """A tensor of the param's shape holding one scalar (a constant branch of an element value)."""
        return f"torch.full_like(param, {value})"

    def where(self, c: str, a: str, b: str) -> str:
        return f"torch.where({c}, {a}, {b})"

    def compare(self, op: str, a: str, b: str) -> str:
        return f"torch.{op}({a}, {b})"

    def each(self, host_value: str) -> str:
        """A host scalar where the op is spelled per tensor (torch broadcasts it)."""
        return host_value

    def with_host(self, op: str, mask: str, host_bool: str) -> str:
        """A lane mask and-ed / or-ed with a host boolean (a flag)."""
        return f"({mask} {'&' if op == 'logical_and' else '|'} bool({host_bool}))"

    def logical_not(self, mask: str) -> str:
        return f"torch.logical_not({mask})"

    def with_scalar(self, fn: str, x: str, s: str) -> str:
        """A binary op that takes tensors only (``torch.fmax``) with a scalar: a 0-dim CPU tensor
        (allowed next to a tensor on any device)."""
        return f"torch.{fn}({x}, torch.tensor({s}, dtype={x}.dtype))"

    def reduce(self, op: str, x: str, item: bool = True) -> str:
        """A per-tensor reduction; over a local shard (``_shards``, optcompile/sharding.py) the
        all-reduce of every shard's partial."""
        value = f"{_reduction(op, x)} if _shards is None else _shards.{op}({x}, _i)"
        return f"({value}).item()" if item else value

    def numel(self) -> str:
        """``numel``: of the whole tensor, also when the loop steps a local shard."""
        return "param.numel() if _shards is None else _shards.numel[_i]"

    def along(self, op: str, x: str, axis: int) -> str:
        """``x`` reduced along dim ``axis``, keeping it (``spec.mean(x, axis=...)``)."""
        return _along(op, x, axis)

    def tensor_fn(self, fn: str, x: str, args: list[str], batched: bool) -> str:
        """A host tensor function (``spec.matrix_fn``) of one tensor, its result checked and in
        ``x``'s dtype (runtime.apply_tensor_fn); a batched one sees a batch of one."""
        return f"_apply_tensor_fn({', '.join([fn, x, *args])}{', batched=True' if batched else ''})"

    def sync(self, name: str, slot: int) -> list[str]:
        """After storing a low-precision buffer that is read again: read back the rounded value.
        (A buffer stored in fp32 is its own compute view: nothing to do.)"""
        return [f"if {name} is not _{name}_s:", "    " + self.store(name, slot), f"    {name}.copy_(_{name}_s)"]

    def store(self, name: str, slot: int) -> str:
        """Round the fp32 compute view into low-precision storage: to nearest, or stochastically
        (``_sr``: optcompile/rounding.py; ``slot`` is the buffer's position in the plan)."""
        return f"_{name}_s.copy_({name}) if _sr is None else _sr_copy_(_{name}_s, {name}, _sr, _i, {slot})"

    def writeback(self, name: str, slot: int) -> list[str]:
        return [f"if {name} is not _{name}_s:", "    " + self.store(name, slot)]


class ForeachDialect(Dialect):
    """How foreach code spells an op on a list of tensors (one device and dtype)."""

    per_tensor_scalars_are_lists = True

    def new(self, fn: str, *args: str, **kw: str) -> str:
        if fn in _NO_FOREACH:
            names = [f"_a{i}" for i in range(len(args))]
            return f"[torch.{fn}({_args(names, kw)}) for {', '.join(names)} in zip({', '.join(args)})]"
        return f"torch._foreach_{fn}({_args(args, kw)})"

    def inplace(self, target: str, fn: str, *args: str, **kw: str) -> str:
        return f"torch._foreach_{fn}_({_args((target,) + tuple(args), kw)})"

    def copy(self, target: str, src: str) -> str:
        return f"torch._foreach_copy_({target}, {src})"

    def clone(self, x: str) -> str:
        return f"[_x.clone() for _x in {x}]"

    def full(self, value: str, per_tensor: bool = False) -> str:
        if per_tensor:  # a list: one value per tensor
            return f"[torch.full_like(_p, _v) for _p, _v in zip(param, {value})]"
        return f"[torch.full_like(_p, {value}) for _p in param]"

    def where(self, c: str, a: str, b: str) -> str:
        return f"[torch.where(_c, _a, _b) for _c, _a, _b in zip({c}, {a}, {b})]"

    def compare(self, op: str, a: str, b: str) -> str:
        return f"[torch.{op}(_a, _b) for _a, _b in zip({a}, {b})]"

    def each(self, host_value: str) -> str:  # zipped with the tensor lists: one per tensor
        return f"[{host_value}] * len(param)"

    def with_host(self, op: str, mask: str, host_bool: str) -> str:
        return f"[_c {'&' if op == 'logical_and' else '|'} bool({host_bool}) for _c in {mask}]"

    def logical_not(self, mask: str) -> str:
        return f"[torch.logical_not(_c) for _c in {mask}]"

    def with_scalar(self, fn: str, x: str, s: str) -> str:  # s: one scalar per tensor
        return f"[torch.{fn}(_x, torch.tensor(_s, dtype=_x.dtype)) for _x, _s in zip({x}, {s})]"

    def reduce(self, op: str, x: str, item: bool = True) -> str:  # over local shards: one collective
        local = f"[{_reduction(op, '_x')}{'.item()' if item else ''} for _x in {x}]"
        return f"{local} if _shards is None else " + (f"[_v.item() for _v in _shards.{op}({x})]" if item
                                                     else f"_shards.{op}({x})")

    def numel(self) -> str:
        return "[_p.numel() for _p in param] if _shards is None else list(_shards.numel)"

    def along(self, op: str, x: str, axis: int) -> str:
        return f"[{_along(op, '_x', axis)} for _x in {x}]"

    def tensor_fn(self, fn: str, x: str, args: list[str], batched: bool) -> str:
        """Per tensor, or once over the stack of the call's tensors (same-shaped: the runtime groups
        the params of a batched function by shape)."""
        if batched:
            return f"_apply_tensor_fn_stacked({', '.join([fn, x, *args])})"
        return f"[_apply_tensor_fn({', '.join([fn, '_x', *args])}) for _x in {x}]"

    def sync(self, name: str, slot: int) -> list[str]:
        return [f"if {name} is not _{name}_s:", "    " + self.store(name, slot),
                f"    torch._foreach_copy_({name}, _{name}_s)"]

    def store(self, name: str, slot: int) -> str:
        return (f"torch._foreach_copy_(_{name}_s, {name}) if _sr is None else "
                f"_sr_foreach_copy_(_{name}_s, {name}, _sr, {slot})")

    def writeback(self, name: str, slot: int) -> list[str]:
        return [f"if {name} is not _{name}_s:", "    " + self.store(name, slot)]


_NO_FOREACH = {"square", "where", "rsqrt_scalar", "fmax", "fmin", "clamp"}


def _reduction(op: str, x: str) -> str:
    """``x.sum()``, ``x.mean()``, ``x.max()``; the max of an empty tensor is -inf (torch raises), as
    in the fused and Triton kernels, whose max starts from -inf."""
    if op == "max":
        return f"({x}.max() if {x}.numel() else {x}.new_full((), -math.inf))"
    return f"{x}.{op}()"


def _along(op: str, x: str, axis: int) -> str:
    """``torch.sum/mean/amax(x, dim=axis, keepdim=True)``; an empty dim's max is -inf, as a full ``max``."""
    fn = "amax" if op == "max" else op
    call = f"torch.{fn}({x}, dim={axis}, keepdim=True)"
    if op == "max":
        return f"({call} if {x}.size({axis}) else {x}.sum(dim={axis}, keepdim=True).fill_(-math.inf))"
    return call


def _per_tensor(text: str, names) -> str:
    """``[text for a, b in zip(a, b)]``: a per-tensor scalar over the lists of one foreach call."""
    names = list(names)
    loop = f"{names[0]} in {names[0]}" if len(names) == 1 else f"{', '.join(names)} in zip({', '.join(names)})"
    return f"[{text} for {loop}]"


class DevicePrinter(HostPrinter):
    """Per-tensor math on 0-dim tensors (a reduction's ``sqrt``), so it rounds in the compute dtype
    like the reduction itself and like a kernel would; ``.item()`` happens once, at the end."""

    FUNCTIONS = {"exp": "torch.exp", "log": "torch.log", "Abs": "torch.abs"}
    SQRT, RSQRT = "torch.sqrt", "torch.rsqrt"

    def reciprocal(self, base, n: int) -> str | None:  # torch's division is IEEE already (±inf at 0)
        return f"(1.0 / {self.parenthesize(base, 100)})" if n == 1 else None

    def power(self, base, exp) -> str:  # and so is its pow
        return f"{self.parenthesize(base, 100)}**{self.parenthesize(exp, 100)}"

    def receiver(self, e) -> str:
        """``e`` as the receiver of a method call: a name or a single call as printed, anything
        else in parentheses (``.item()`` would bind to the last factor of ``a/b``)."""
        text = self.doprint(e)
        call = isinstance(e, sympy.core.function.Application) or \
            (isinstance(e, sympy.Pow) and e.exp in (sympy.Rational(1, 2), -sympy.Rational(1, 2)))
        return text if e.is_Symbol or call else f"({text})"


_DEVICE_PRINTER = DevicePrinter({"fully_qualified_modules": True, "standard": "python3"})


class TensorScalarPrinter(HostPrinter):
    """Per-tensor math on Python floats: a division by a per-tensor value is IEEE (``runtime.div``:
    ``x/0 = ±inf``, ``0/0 = nan``), as in the kernels, for a zero sum or the ``numel`` of an empty
    tensor, where Python raises. Host-only math keeps the host printer's rules."""

    def __init__(self, per_tensor: set[str]):
        super().__init__({"fully_qualified_modules": True, "standard": "python3"})
        self.per_tensor = per_tensor

    def _print_Mul(self, expr):
        den = [f for f in sympy.Mul.make_args(expr) if f.is_Pow and f.exp.is_Rational and f.exp.is_negative
               and {s.name for s in f.base.free_symbols} & self.per_tensor]
        if not den:
            return super()._print_Mul(expr)
        num = sympy.Mul(*[f for f in sympy.Mul.make_args(expr) if f not in den])
        d = sympy.Mul(*[sympy.Pow(f.base, -f.exp) for f in den])
        return f"_div({self._print(num)}, {self._print(d)})"

    def _print_Pow(self, expr, rational=False):
        if expr.exp.is_Rational and expr.exp.is_negative and expr.exp != -1 and \
                {s.name for s in expr.base.free_symbols} & self.per_tensor:
            return self._print_Mul(sympy.Mul(1, expr, evaluate=False))
        return super()._print_Pow(expr, rational)


def tensor_pyexpr(e, per_tensor: set[str]) -> str:
    """A scalar expression as Python: :class:`TensorScalarPrinter` where it reads per-tensor values."""
    e = sympy.sympify(e)
    if {s.name for s in e.free_symbols} & per_tensor:
        return TensorScalarPrinter(per_tensor).doprint(e)
    return pyexpr(e)
_DEVICE_NODES = (sympy.Symbol, sympy.Number, sympy.Add, sympy.Mul, sympy.Pow)


def device_scalars(prog: Program) -> tuple[set[str], set[str]]:
    """Reductions, and per-tensor scalars computed from reductions alone (``sqrt(mean(…))``),
    stay 0-dim tensors; returns them and those of them that other code reads as Python floats."""
    device: set[str] = set()
    for s in prog.body:
        if isinstance(s, Reduction):
            device.add(s.name)
        elif isinstance(s, TensorScalar):
            e = sympy.sympify(s.expr)
            names = {x.name for x in e.free_symbols}
            if names and names <= device and all(isinstance(n, _DEVICE_NODES) for n in sympy.preorder_traversal(e)):
                device.add(s.name)
    floats = set()
    for s in prog.body:
        if getattr(s, "name", None) not in device:
            floats |= {x.name for x in sympy.sympify(s.expr).free_symbols} & device
    return device, floats


def _not_one(c) -> str:
    """``c != 1`` as a reader writes it: ``1 - decay`` differs from 1 exactly when ``decay != 0``
    (in floats too, up to a ``decay`` so small that ``1 - decay`` rounds to 1: a multiply by 1.0)."""
    k, rest = sympy.sympify(c).as_coeff_Add()
    if k == 1 and rest != 0:
        return f"{pyexpr(-rest if rest.could_extract_minus_sign() else rest)} != 0"
    return f"{pyexpr(c)} != 1"


def _args(args, kw) -> str:
    parts = list(args) + [f"{k}={v}" for k, v in kw.items() if v is not None]
    return ", ".join(parts)


class TensorCode:
    """Emit the body of one backend function for ``prog``, statement by statement."""

    def __init__(self, prog: Program, dialect: Dialect):
        self.prog, self.d = prog, dialect
        self.host_defs = host_of(prog)
        self.forms = Forms(prog)  # which statements are lerps, how a linear update groups: shared with the kernels
        self.tscalars = self.forms.tensor_scalars
        self.stored = set(prog.stored())
        self.lines: list[str] = []
        self.indent = ""
        self.owned: set[str] = set()
        self.tmp = itertools.count()
        self.definitions: dict[str, list[tuple[int, str]]] = {}  # temp → (line index, value) of each definition
        self.scalar_tmp = itertools.count()
        self.written_later: set[str] = set()
        self.device, self.floats = device_scalars(prog)
        self.readers_on_device = {x.name for t in prog.body if getattr(t, "name", None) in self.device
                                  and isinstance(t, TensorScalar) for x in sympy.sympify(t.expr).free_symbols}

    # ── classification (the Forms' names: one set for the torch printers and the kernels) ─────────
    @property
    def host(self) -> set[str]:
        return self.forms.host

    @host.setter
    def host(self, names: set[str]) -> None:
        self.forms.host = names

    def is_scalar(self, e) -> bool:
        return self.forms.is_scalar(e)

    def is_host(self, e) -> bool:
        return self.forms.is_host(e)

    def emit(self, line: str) -> None:
        self.lines.append(self.indent + line)

    def define(self, tmp: str, value: str) -> None:
        """``tmp = value``, remembered: a temp defined by exactly the last line can take the name
        of the statement's target instead (``assign``)."""
        self.definitions.setdefault(tmp, []).append((len(self.lines), value))
        self.emit(f"{tmp} = {value}")

    def new_tmp(self) -> str:
        name = f"_t{next(self.tmp)}"
        self.owned.add(name)
        return name

    # ── scalars ────────────────────────────────────────────────────────────────────────────────
    def scalar(self, e) -> str:
        """A scalar operand: host values print inline; per-tensor values are lists in foreach."""
        e = sympy.sympify(e)
        text = tensor_pyexpr(e, self.tscalars)
        per_tensor = sorted({s.name for s in e.free_symbols} & self.tscalars)
        if not per_tensor or not self.d.per_tensor_scalars_are_lists:
            return text
        if len(per_tensor) == 1 and e == sympy.Symbol(per_tensor[0], real=True):
            return per_tensor[0]
        name = f"_s{next(self.scalar_tmp)}"
        self.emit(f"{name} = {_per_tensor(text, per_tensor)}")
        return name

    def numeric_one(self, e) -> bool:
        return sympy.sympify(e) == 1

    # ── statements ─────────────────────────────────────────────────────────────────────────────
    def device_name(self, name: str) -> str:
        """The 0-dim tensor of a device scalar that is also read as a float (``mean0_t``)."""
        return f"{name}_t" if name in self.floats else name

    def scalar_line(self, name: str, text: str, names) -> None:
        """``name = text``; in foreach, one value per tensor over the per-tensor ``names`` it reads."""
        names = list(names)
        self.emit(f"{name} = {_per_tensor(text, names) if self.d.per_tensor_scalars_are_lists and names else text}")

    def statement(self, s) -> None:
        if isinstance(s, Reduction):
            x = self.atom(s.expr)
            on_device = s.name in self.readers_on_device  # stays a 0-dim tensor for sqrt(...) & co
            target = self.device_name(s.name) if on_device else s.name
            self.emit(f"{target} = {self.d.reduce(s.op, x, item=not on_device)}")
            if on_device and s.name in self.floats:
                self.scalar_line(s.name, f"{s.name}_t.item()", [f"{s.name}_t"])
        elif isinstance(s, TensorScalar):
            e = sympy.sympify(s.expr)
            per_tensor = sorted({x.name for x in e.free_symbols} & self.tscalars)
            if s.name not in self.device:
                self.scalar_line(s.name, tensor_pyexpr(e, self.tscalars), per_tensor)
                return
            on_device = e.xreplace({x: sympy.Symbol(self.device_name(x.name), real=True) for x in e.free_symbols})
            names = [self.device_name(n) for n in per_tensor]
            if s.name not in self.readers_on_device:
                self.scalar_line(s.name, f"{_DEVICE_PRINTER.receiver(on_device)}.item()", names)
                return
            self.scalar_line(self.device_name(s.name), _DEVICE_PRINTER.doprint(on_device), names)
            if s.name in self.floats:
                self.scalar_line(s.name, f"{s.name}_t.item()", [f"{s.name}_t"])
        elif isinstance(s, TensorFunction):
            x = self.atom(s.input)
            self.emit(f"{s.name} = {self.d.tensor_fn(s.fn, x, [self.scalar(a) for a in s.args], s.batched)}")
            self.owned.add(s.name)
        else:
            self.assign(s.symbol, sympy.sympify(s.expr))

    def assign(self, x: sympy.Symbol, e) -> None:
        if e == x:  # x ← x: nothing to do (and nothing to print)
            return
        target = x.name
        in_place = target in self.stored or target in self.owned
        if in_place and x in e.free_symbols and self.linear_update(x, e):
            return
        if isinstance(e, sympy.Symbol) and not self.is_scalar(e):
            src = e.name
            if target in self.stored:
                self.emit(self.d.copy(target, src))
            elif src in self.written_later:  # a snapshot: the source is updated in place later
                self.emit(f"{target} = {self.d.clone(src)}")
                self.owned.add(target)
            else:  # an alias: nothing writes the source again
                self.emit(f"{target} = {src}")
                self.owned.discard(target)
            return
        if target in self.stored and x not in e.free_symbols and \
                self.build_in_place(target, e):
            return
        value = self.fresh(e)
        if target in self.stored:
            self.emit(self.d.copy(target, value))
        elif [i for i, _ in self.definitions.get(value, ())] == [len(self.lines) - 1]:
            self.lines[-1] = f"{self.indent}{target} = {self.definitions[value][0][1]}"  # one op: name it directly
            self.owned.add(target)
        else:
            self.emit(f"{target} = {value}")
            self.owned.add(target)

    def build_in_place(self, target: str, e) -> bool:
        """``x ← c·y + Σ cᵢ·fᵢ`` with ``x`` not read: copy ``y`` into ``x`` and finish in place, so a
        stored buffer needs no temporary (``prev_grad ← -grad``, Kahan's residual)."""
        terms = [self.split_scalar(t) for t in sympy.Add.make_args(e)]
        first = next((i for i, (c, t) in enumerate(terms) if isinstance(t, sympy.Symbol) and self.is_host(c)), None)
        if first is None:
            return False
        c, t = terms.pop(first)
        self.emit(self.d.copy(target, t.name))
        if not self.numeric_one(c):
            self.emit(self.d.inplace(target, "neg") if c == -1 else self.d.inplace(target, "mul", self.scalar(c)))
        for c, t in terms:
            self.accumulate(target, c, t)
        return True

    def linear_update(self, x: sympy.Symbol, e) -> bool:
        """``x ← a·x + Σ cᵢ·fᵢ`` (or ``c·(…)``) in place. False when ``e`` is not of that form."""
        target = x.name
        parts = self.forms.linear_parts(x, e)
        if parts is None:
            return False
        outer, a, others = parts
        for i, (c, t) in enumerate(others):  # a term that reads x is built before x changes
            if x in t.free_symbols:
                others[i] = (c, sympy.Symbol(self.fresh(t), real=True))
        lerp = self.forms.in_place_lerp(x, (outer, a, others))
        if lerp is not None:
            t, c = lerp
            self.emit(self.d.inplace(target, "lerp", self.atom(t), self.scalar(c)))
            return True
        if not self.numeric_one(a):
            self.mul_by(target, a)
        for c, t in others:
            self.accumulate(target, c, t)
        if not self.numeric_one(outer):
            self.mul_by(target, outer)
        return True

    def mul_by(self, target: str, c) -> None:
        c = sympy.sympify(c)
        if isinstance(c, sympy.Pow) and c.exp == -1 and self.is_scalar(c.base):  # x/s: divide, as written
            c, line = c.base, self.d.inplace(target, "div", self.scalar(c.base))
        else:
            line = self.d.inplace(target, "mul", self.scalar(c))
        if self.is_host(c) and not sympy.sympify(c).is_Number:
            self.emit(f"if {_not_one(c)}:")  # e.g. decay != 0: with weight_decay=0, skip a pass
            self.emit("    " + line)
        else:
            self.emit(line)

    def split_scalar(self, term):
        """``term = c · t`` with ``c`` scalar (host or per-tensor) and ``t`` the tensor part."""
        return self.forms.split_scalar(term)

    def accumulate(self, target: str, c, t) -> None:
        """``target += c·t`` with the fewest ops: add_, addcmul_, addcdiv_."""
        if t == 1:
            self.emit(self.d.inplace(target, "add", self.scalar(c)))
            return
        num, den = self.split_fraction(t)
        lists = self.d.per_tensor_scalars_are_lists and not self.is_host(c)
        value = None if self.numeric_one(c) else self.scalar(c)
        if len(num) == 2 and not den and not lists:
            self.emit(self.d.inplace(target, "addcmul", self.atom(num[0]), self.atom(num[1]), value=value))
        elif len(num) == 2 and not den:
            self.emit(self.d.inplace(target, "addcmul", self.atom(num[0]), self.atom(num[1]), value))
        elif len(num) == 1 and len(den) == 1:
            kw = {"value": value} if not lists else {}
            args = (self.atom(num[0]), self.atom(den[0])) + ((value,) if lists else ())
            self.emit(self.d.inplace(target, "addcdiv", *args, **kw))
        elif len(num) == 1 and not den and c == -1:
            self.emit(self.d.inplace(target, "sub", self.atom(num[0])))
        elif len(num) == 1 and not den and not lists:
            self.emit(self.d.inplace(target, "add", self.atom(num[0]), alpha=value))
        else:
            tmp = self.fresh(t)
            if value is None:
                self.emit(self.d.inplace(target, "add", tmp))
            elif lists:
                self.emit(self.d.inplace(tmp, "mul", value))
                self.emit(self.d.inplace(target, "add", tmp))
            else:
                self.emit(self.d.inplace(target, "add", tmp, alpha=value))

    def split_fraction(self, t):
        """Tensor factors of a product, as numerator and denominator lists (``x**2`` → x, x)."""
        num, den = [], []
        for f in sympy.Mul.make_args(t):
            base, exp = (f.args if isinstance(f, sympy.Pow) else (f, sympy.Integer(1)))
            if exp.is_Integer and 0 < exp <= 2:
                num += [base] * int(exp)
            elif exp.is_Integer and -2 <= exp < 0:
                den += [base] * int(-exp)
            else:
                num.append(f)
        if len(den) == 2 and len(num) <= 1:
            return num, [sympy.Mul(*den)]
        return num, den

    # ── expressions into fresh temporaries ─────────────────────────────────────────────────────
    def atom(self, e) -> str:
        e = sympy.sympify(e)
        if isinstance(e, sympy.Symbol) and not self.is_scalar(e):
            return e.name
        return self.fresh(e)

    def operand(self, e) -> str:
        """A tensor name or a scalar expression (for ops that take either)."""
        return self.scalar(e) if self.is_scalar(e) else self.atom(e)

    def zipped_operand(self, e) -> str:
        """An operand of an op the foreach dialect spells as a comprehension over zipped lists
        (``where``, comparisons): there a host scalar must be a list too."""
        return self.d.each(self.scalar(e)) if self.is_host(e) else self.operand(e)

    def fresh(self, e) -> str:
        """Build ``e`` into a new temporary that this code owns; return its name."""
        e = sympy.sympify(e)
        if self.is_scalar(e):  # an element value that is a scalar in one branch: Piecewise((sqrt(v), f), (1, True))
            tmp = self.new_tmp()
            self.define(tmp, f"{self.d.full(self.scalar(e), per_tensor=not self.is_host(e))}")
            return tmp
        if isinstance(e, sympy.Add):
            return self.fresh_add(e)
        if isinstance(e, sympy.Mul):
            return self.fresh_mul(e)
        if isinstance(e, sympy.Pow):
            return self.fresh_pow(e)
        tmp = self.new_tmp()
        if isinstance(e, sympy.Symbol):
            self.define(tmp, f"{self.d.clone(e.name)}")
        elif isinstance(e, (sympy.Max, sympy.Min)):
            # the DSL's Max/Min ignore a NaN operand: torch.fmax/fmin (clamp and maximum propagate it)
            fn = "fmax" if isinstance(e, sympy.Max) else "fmin"
            tensors = [a for a in e.args if not self.is_scalar(a)]
            scalars = [a for a in e.args if self.is_scalar(a)]
            out = self.atom(tensors[0])
            for t in tensors[1:]:
                self.define(tmp, f"{self.d.new(fn, out, self.atom(t))}")
                out = tmp
            if scalars:  # one scalar operand: their Max (fmax is associative)
                self.define(tmp, f"{self.d.with_scalar(fn, out, self.zipped_operand(e.func(*scalars)))}")
        elif isinstance(e, sympy.Piecewise):
            self.fresh_where(tmp, e)
        elif isinstance(e, Clamp):
            self.fresh_clamp(tmp, e)
        elif isinstance(e, AxisReduction):
            self.define(tmp, self.d.along(e.op, self.atom(e.args[0]), e.axis))
        elif isinstance(e, (sympy.Abs, sympy.sign, sympy.exp, sympy.log)):
            fn = {sympy.Abs: "abs", sympy.sign: "sign", sympy.exp: "exp", sympy.log: "log"}[e.func]
            return self.unary(fn, e.args[0])
        else:
            raise NotImplementedError(f"cannot print {e.func.__name__} in torch code: {e}")
        return tmp

    def unary(self, fn: str, arg) -> str:
        if isinstance(arg, sympy.Symbol):
            tmp = self.new_tmp()
            self.define(tmp, f"{self.d.new(fn, arg.name)}")
            return tmp
        inner = self.fresh(arg)
        self.emit(self.d.inplace(inner, fn))
        return inner

    def lerp_pair(self, terms):
        """``a·x + b·y`` with host ``a + b == 1`` and tensors ``x``, ``y``: (x, y, b) for lerp(x, y, b).

        The end point is the term whose weight is written ``1 − …`` (torch's ``lerp(m, g, 1 − β)``)."""
        return self.forms.lerp_pair(terms)

    def fresh_add(self, e) -> str:
        terms = [self.split_scalar(t) for t in sympy.Add.make_args(e)]
        pair = self.lerp_pair(terms)
        if pair is not None:
            x, y, w = pair
            tmp = self.new_tmp()
            self.define(tmp, f"{self.d.new('lerp', self.atom(x), self.atom(y), self.scalar(w))}")
            return tmp
        scalar_part = sympy.Add(*[c for c, t in terms if t == 1])
        tensor_terms = [(c, t) for c, t in terms if t != 1]
        # start from a bare tensor if there is one: torch.add / addcmul / addcdiv fuse the next term
        start = next((i for i, (c, t) in enumerate(tensor_terms) if self.numeric_one(c) and
                      isinstance(t, sympy.Symbol)), None)
        nxt = [i for i in range(len(tensor_terms)) if i != start]
        if start is not None and nxt and self.is_host(tensor_terms[nxt[0]][0]):
            base = tensor_terms[start][1].name
            c, t = tensor_terms[nxt[0]]
            tensor_terms = [x for i, x in enumerate(tensor_terms) if i not in (start, nxt[0])]
            num, den = self.split_fraction(t)
            value = None if self.numeric_one(c) else self.scalar(c)
            # operands first, then the result's name: temporaries are numbered in order of definition
            if len(num) == 1 and len(den) == 1:
                call = self.d.new('addcdiv', base, self.atom(num[0]), self.atom(den[0]), value=value)
            elif len(num) == 2 and not den:
                call = self.d.new('addcmul', base, self.atom(num[0]), self.atom(num[1]), value=value)
            elif c == -1:
                call = self.d.new('sub', base, self.atom(t))
            else:
                call = self.d.new('add', base, self.atom(t), alpha=value)
            tmp = self.new_tmp()
            self.define(tmp, f"{call}")
        else:
            c, t = tensor_terms.pop(0)
            tmp = self.fresh(t)
            if not self.numeric_one(c):
                self.emit(self.d.inplace(tmp, "mul", self.scalar(c)))
        for c, t in tensor_terms:
            self.accumulate(tmp, c, t)
        if scalar_part != 0:
            self.emit(self.d.inplace(tmp, "add", self.scalar(scalar_part)))
        return tmp

    def fresh_mul(self, e) -> str:
        c, t = self.split_scalar(e)
        num, den = self.split_fraction(t)
        scaled = False
        if not num:  # operands first, then the result's name (numbered in order of definition)
            call = self.d.new('reciprocal', self.atom(den.pop(0)))
        elif len(num) >= 2:
            call = self.d.new('mul', self.atom(num[0]), self.atom(num[1]))
            num = num[2:]
        elif den:
            call = self.d.new('div', self.atom(num[0]), self.atom(den.pop(0)))
            num = []
        elif c == -1:  # -x, as written (exact, like x·(-1))
            call, scaled = self.d.new('neg', self.atom(num[0])), True
        elif not self.numeric_one(c):
            call, scaled = self.d.new('mul', self.atom(num[0]), self.scalar(c)), True
        else:
            call = self.d.clone(self.atom(num[0]))
            num = []
        tmp = self.new_tmp()
        self.define(tmp, f"{call}")
        if scaled:
            return tmp
        for f in num:
            self.emit(self.d.inplace(tmp, "mul", self.atom(f)))
        for f in den:
            self.emit(self.d.inplace(tmp, "div", self.atom(f)))
        if not self.numeric_one(c):
            self.emit(self.d.inplace(tmp, "mul", self.scalar(c)))
        return tmp

    def fresh_pow(self, e) -> str:
        base, exp = e.args
        if self.is_scalar(base):
            tmp = self.new_tmp()
            self.define(tmp, f"{self.d.new('pow', self.scalar(base), self.atom(exp))}")
            return tmp
        fn = {sympy.Rational(1, 2): "sqrt", -sympy.Rational(1, 2): "rsqrt", sympy.Integer(-1): "reciprocal"}.get(exp)
        if fn:
            return self.unary(fn, base)
        tmp = self.new_tmp()
        if exp == 2:
            x = self.atom(base)
            self.define(tmp, f"{self.d.new('mul', x, x)}")
        else:
            self.define(tmp, f"{self.d.new('pow', self.atom(base), self.scalar(exp))}")
        return tmp

    def fresh_clamp(self, tmp: str, e) -> None:
        """``torch.clamp`` (NaN in ``x`` or a bound propagates; ``lo > hi`` gives ``hi``): one call when
        both bounds are scalars or both tensors (torch has no mixed overload), else ``clamp_min``
        then ``clamp_max``, which compute the same ``min(max(x, lo), hi)``."""
        x, lo, hi = e.args
        bounds = [(fn, b) for fn, b in (("clamp_min", lo), ("clamp_max", hi)) if b not in (-sympy.oo, sympy.oo)]
        out = self.atom(x)
        if len(bounds) == 2 and self.is_scalar(lo) == self.is_scalar(hi):
            self.emit(f"{tmp} = {self.d.new('clamp', out, self.zipped_operand(lo), self.zipped_operand(hi))}")
            return
        for fn, b in bounds:
            self.emit(f"{tmp} = {self.d.new(fn, out, self.zipped_operand(b))}")
            out = tmp

    def fresh_where(self, tmp: str, e) -> None:
        (value, cond), rest = e.args[0], e.args[1:]
        other = rest[0][0] if len(rest) == 1 and rest[0][1] == TRUE else sympy.Piecewise(*rest)
        c = self.condition(cond)
        self.define(tmp, f"{self.d.where(c, self.zipped_operand(value), self.zipped_operand(other))}")

    def condition(self, cond) -> str:
        ops = {sympy.StrictGreaterThan: "gt", sympy.GreaterThan: "ge", sympy.StrictLessThan: "lt",
               sympy.LessThan: "le", sympy.Equality: "eq", sympy.Unequality: "ne"}
        if type(cond) in ops:
            a, b = cond.args
            if self.is_scalar(a):
                a, b = b, a
                swap = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}
                op = swap.get(ops[type(cond)], ops[type(cond)])
            else:
                op = ops[type(cond)]
            return self.d.compare(op, self.atom(a), self.zipped_operand(b))
        logic = {sympy.And: "logical_and", sympy.Or: "logical_or"}
        if type(cond) in logic:
            host = [a for a in cond.args if self.is_host(a)]  # flags: one Python bool for all of them
            parts = [self.condition(a) for a in cond.args if not self.is_host(a)]
            out = parts[0]
            for p in parts[1:]:
                out = self.d.compare(logic[type(cond)], out, p)
            if host:
                out = self.d.with_host(logic[type(cond)], out, pyexpr(type(cond)(*host)))
            return out
        if isinstance(cond, sympy.Not):
            return self.d.logical_not(self.condition(cond.args[0]))
        raise NotImplementedError(f"tensor condition {cond}")


def buffer_slot(prog: Program, name: str) -> int:
    """A stored buffer's position in the kernel plan's buffers: it salts the random bits of
    stochastic rounding, the same on every backend."""
    from ..kernel_plan import buffer_names, stored_slot
    return stored_slot(buffer_names(prog), name)


def guard_text(guard) -> str | None:
    return None if guard == TRUE else pyexpr(guard)


def _may_run_together(a, b) -> bool:
    """False only when two host guards provably exclude each other (``kahan`` and ``~kahan``)."""
    return satisfiable(sympy.And(a, b))


def _implies(a, b) -> bool:
    """Whether host guard ``a`` provably implies ``b`` (unsure: False)."""
    return not satisfiable(sympy.And(a, sympy.Not(b)))


def emit_body(prog: Program, dialect: Dialect, stmts, tmp=None, after=()) -> tuple[list[str], list[str]]:
    """Statements with their guards (consecutive ones share an ``if``), then the buffers to write
    back when compute views are fp32 copies of low-precision storage.

    A stored buffer that a later statement reads (here or in a later stage, ``after``) is synced right
    after the write, so the read sees the rounded value: this is what makes Kahan summation measure
    the real rounding error. Only buffers with a write that was not synced need a write-back.
    """
    code = TensorCode(prog, dialect)
    if tmp is not None:  # one numbering across stages: a name means one thing in a function
        code.tmp = tmp
    stmts = list(stmts)
    out: list[str] = []
    written: list[str] = []
    current = None
    owned_where: dict[str, object] = {}  # a temp the code owns → the host condition under which it does
    for i, s in enumerate(stmts):
        g = guard_text(s.guard)
        code.lines, code.indent, code.definitions = [], "", {}
        code.written_later = {getattr(r, "target", None) for r in stmts[i + 1:]}
        # owned here only where its owning write ran whenever this statement runs: after
        # `if maximize: grad = -grad`, `grad` may still be the caller's gradient
        code.owned = {n for n, w in owned_where.items() if w == TRUE or w == s.guard or _implies(s.guard, w)}
        before = set(code.owned)
        code.statement(s)
        for n in code.owned - before:
            owned_where[n] = sympy.Or(owned_where.get(n, sympy.false), s.guard)
        target = getattr(s, "target", None)
        if target is not None and target not in code.owned:
            owned_where.pop(target, None)  # an alias now, at least where this statement ran
        if not code.lines:  # nothing to run (x ← x): no empty `if`
            continue
        if target in code.stored:
            later = set().union(*[{x.name for x in sympy.sympify(r.expr).free_symbols}
                                  for r in stmts[i + 1:] + list(after)  # `after`: later stages
                                  if _may_run_together(s.guard, r.guard)])
            if target in later:
                code.lines += dialect.sync(target, buffer_slot(prog, target))
            elif target not in written:
                written.append(target)
        pad = "    " if g is not None else ""
        if g is not None and g != current:
            out.append(f"if {g}:")
        out += [pad + line for line in code.lines]
        current = g
    return out, written
