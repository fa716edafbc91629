"""Weight decay, injected into any spec that leaves it to the compiler (optimi's three modes).

* L2 (``decouple_wd=False``): ``g ← g + wd·p`` before anything reads the gradient. Unlike optimi
  we do not write it back into ``p.grad``. A spec's ``decoupled_flag`` takes the switch's place
  (NAdam's ``decoupled_weight_decay``, torch.optim's name).
* decoupled (AdamW): ``p ← p·(1 − lr·wd) − lr·d``, written as one update. The decay is part of
  Δp, so the Kahan pass compensates it too: in bf16 a small ``lr·wd`` no longer rounds away.
* fully decoupled (``decouple_lr=True``): ``lr/max_lr·wd``, so decay does not follow the schedule.
* proximal (Adan): ``p ← (p − lr·d)/(1 + lr·wd)``, or decoupled when the spec's flag is set.

The learning rate is the *effective* one given to ``spec.update`` (StableAdamW's clipped lr), or
its ``decay_lr=`` where the spec gives one (Adafactor decays by the group's lr, not its step size).
"""
from __future__ import annotations

import dataclasses

import sympy
from sympy import And, Ne, Not, Or, Piecewise, Symbol

from ..ir import GRAD, PARAM, TRUE, Arg, Assign, HostScalar, Origin, Program, TensorScalar

ORIGIN = Origin(added_by="weight_decay")

DECOUPLE_WD_DOC = "apply decoupled weight decay instead of L2 penalty"
DECOUPLE_LR_DOC = "apply fully decoupled weight decay: decay with lr/max_lr, not lr"
MAX_LR_DOC = "maximum scheduled learning rate; set if lr is not the maximum (defaults to lr)"


def add_weight_decay(prog: Program) -> Program:
    if prog.weight_decay is None or prog.arg("decouple_lr") is not None:
        return prog
    wd = Symbol("weight_decay", real=True)
    decouple_lr, max_lr = Symbol("decouple_lr"), Symbol("max_lr", real=True)
    args = [Arg("decouple_lr", "flag", False, ("decouple_lr",), doc=DECOUPLE_LR_DOC, injected_by="weight_decay", type="bool"),
            Arg("max_lr", "optional_float", None, ("max_lr",), doc=MAX_LR_DOC, injected_by="weight_decay")]
    host, body, states = list(prog.host), list(prog.body), list(prog.states)
    lr = prog.update_lr if prog.decay_lr is None else prog.decay_lr
    rate = Piecewise((lr / max_lr * wd, decouple_lr), (lr * wd, True))
    decoupled_on = Ne(wd, 0)

    if prog.weight_decay == "l2":
        decouple_wd = prog.decoupled_flag  # the spec's own switch (torch's decoupled_weight_decay), or ours
        if decouple_wd is None:
            decouple_wd = Symbol("decouple_wd")
            args.insert(0, Arg("decouple_wd", "flag", prog.decouple_wd_default, ("decouple_wd",),
                               doc=DECOUPLE_WD_DOC, injected_by="weight_decay", type="bool"))
        l2 = HostScalar(prog.fresh_name("decay_l2"), And(Ne(wd, 0), Not(decouple_wd), Not(decouple_lr)), "bool",
                        ORIGIN)
        host.append(l2)
        body.insert(0, Assign(GRAD, GRAD + wd * PARAM, l2.sym, ORIGIN, role="decay_l2"))
        # optimi's torch_init momentum buffer starts from the decayed gradient, as torch's does
        states = [dataclasses.replace(s, init=Piecewise((s.init.xreplace({GRAD: GRAD + wd * PARAM}), l2.expr),
                                                        (s.init, True))) if GRAD in sympy.sympify(s.init).free_symbols
                  else s for s in states]
        decoupled_on = And(Ne(wd, 0), Or(decouple_wd, decouple_lr))

    # the decay rate lives with the learning rate: on the host, or per tensor (StableAdamW)
    rate = Piecewise((rate, decoupled_on), (0, True))
    decay = Symbol(prog.fresh_name("decay"), real=True)
    if lr.free_symbols <= {Symbol(n, real=True) for n in prog.host_names()} | {Symbol(n) for n in prog.host_names()}:
        host.append(HostScalar(decay.name, rate, "float", ORIGIN))
    else:
        first_use = next(i for i, s in enumerate(body) if getattr(s, "role", "") == "update")
        body.insert(first_use, TensorScalar(decay.name, rate, TRUE, ORIGIN))

    out = []
    for s in body:
        if not (isinstance(s, Assign) and s.role == "update"):
            out.append(s)
        elif prog.weight_decay == "proximal":
            flag = prog.decoupled_flag if prog.decoupled_flag is not None else sympy.false
            out.append(dataclasses.replace(s, expr=s.expr - decay * PARAM, guard=And(s.guard, flag)))
            out.append(dataclasses.replace(s, expr=s.expr / (1 + decay), guard=And(s.guard, Not(flag))))
        else:
            out.append(dataclasses.replace(s, expr=s.expr - decay * PARAM))
    return prog.replace(args=_insert_after_spec_args(prog.args, args), host=tuple(host), body=tuple(out),
                        states=tuple(states))


def _insert_after_spec_args(spec_args, new_args) -> tuple:
    """Injected arguments go after the spec's own ones, before any placed ``after=`` them."""
    head = [a for a in spec_args if a.after is None]
    tail = [a for a in spec_args if a.after is not None]
    return tuple(head + list(new_args) + tail)
