"""Loading a state dict: check it against this optimizer's layout before anything changes, and
convert the two foreign layouts that map onto ours exactly.

A state dict that would only fail later (a bare ``KeyError`` at the first step, or a fused kernel
writing past a state smaller than its param) is rejected at ``load_state_dict`` with a
``ValueError`` naming the param index, the state or group key and the shapes; torch then never
touches the optimizer, which stays exactly as it was. What a state dict must hold is what
``init_state`` allocates for that param under the *loaded* group's hyperparameters (they replace
the optimizer's), found by running it on a meta tensor of the param's shape: SGD without momentum
has no ``momentum`` buffer, StableAdamW has a 0-dim ``eps_sq``.

Conversions (docs/differences.md, "Checkpoints"):

- optimi's Triton placeholders: with ``triton=True`` optimi stores a 1-element tensor instead of
  ``None`` for a state the step never reads (``kahan_comp`` without Kahan summation, SGD's buffer
  without momentum), and StableAdamW keeps a ``mean_square`` scratch; they load as ``None`` and
  are dropped.
- A state without ``kahan_comp``, or with fp32 training's ``kahan_comp=None``, for a param that
  Kahan summation now applies to (bf16/fp16, ``kahan_sum`` not False): the first step keeps its
  moments and starts the compensation at zero (runtime ``_init_param_state``).
- ``torch.optim.Adam`` / ``AdamW`` state dicts load into ``Adam`` / ``AdamW``: torch keeps the raw
  moments and a per-param float ``step``, optimi the bias-corrected moments and an int32 group
  ``step``, so ``exp_avg / (1 - beta1**t)`` and ``exp_avg_sq / (1 - beta2**t)`` continue the same
  training (``maximize`` too); ``amsgrad`` has no counterpart and is rejected.
- A group without ``maximize`` (optimi's, an older optcompile's) loads with ``maximize=False``.
- torch.optim's own layout, for the classes that are torch.optim's (specs with
  ``state_dict="torch"``: Adadelta, Adagrad, Adamax, RMSprop, Rprop): they *save* it too
  (``to_torch_layout``), so a state dict goes both ways. On load, per-param float ``step`` tensors
  become the group's int32 ``step`` (the largest, where params missed steps), tuple
  hyperparameters (``betas``) their keys (``beta1``, ``beta2``), a state torch does not allocate
  (RMSprop's ``momentum_buffer`` without momentum) None, and optcompile's own group keys
  (``decouple_wd``, ``kahan_sum`` …) are kept from the optimizer. torch.optim.Muon keeps no step
  (``torch_step=False``): none is saved, and none is needed to load.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from . import quantize

from .runtime import uses_kahan

OPTIMI_TRITON_SCRATCH = ("mean_square",)  # optimi's StableAdamW Triton kernel's per-param scratch
TORCH_ONLY_GROUP_KEYS = ("betas", "amsgrad", "foreach", "fused", "capturable", "differentiable",
                         "decoupled_weight_decay")
BACKEND_KEYS = ("kahan_sum", "foreach", "triton", "fused", "gradient_release")
# group keys of passes newer than optimi's layout, with the value that means "off": a group saved
# without one (optimi's, an older optcompile's) ran without it
LATER_GROUP_KEYS = {"maximize": False}
# optcompile's group keys that a torch.optim state dict lacks: the weight-decay pass's and the runtime's
TORCH_LAYOUT_EXTRAS = ("decouple_wd", "decouple_lr", "max_lr") + BACKEND_KEYS


def check_and_convert(optimizer, state_dict: dict) -> dict | None:
    """The state dict to load (a converted copy where needed), or ``ValueError``; never mutates
    the caller's dict. Group/param counts that do not match are left to torch's own error."""
    try:
        return _check_and_convert(optimizer, state_dict)
    except ValueError as exc:
        raise ValueError(f"{exc} (nothing was loaded: the optimizer is unchanged)") from None


def _check_and_convert(optimizer, state_dict: dict) -> dict | None:
    name = f"{type(optimizer).__name__}.load_state_dict"
    saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(saved_groups, list) or not isinstance(saved_state, dict) or not all(
            isinstance(g, dict) and "params" in g for g in saved_groups):
        raise ValueError(f"{name}: expected a dict with 'state' and 'param_groups' (from state_dict()), "
                         f"got keys {sorted(map(str, state_dict))}")
    groups = optimizer.param_groups
    if len(groups) != len(saved_groups) or any(len(g["params"]) != len(s["params"])
                                               for g, s in zip(groups, saved_groups)):
        return None  # torch raises its ValueError about group and param counts next
    converted = False
    if optimizer._info.extra.get("state_dict") == "torch":
        saved_groups, saved_state = _from_torch_layout(optimizer, name, saved_groups, saved_state)
        converted = True
    elif any(_torch_adam(g) for g in saved_groups):
        saved_groups, saved_state = _convert_torch_adam(optimizer, name, saved_groups, saved_state)
        converted = True
    state = dict(saved_state)
    checked = [_check_group(optimizer, name, gi, saved) for gi, saved in enumerate(saved_groups)]
    if any(a is not b for a, b in zip(checked, saved_groups)):
        saved_groups, converted = checked, True
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        expected: dict = {}
        for position, (index, param) in enumerate(zip(saved["params"], group["params"])):
            if index not in state:
                continue
            key = (tuple(param.shape), param.dtype)
            if key not in expected:
                expected[key] = _layout(optimizer, name, gi, saved, param)
            fixed = _check_param_state(optimizer, name, gi, position, index, param, state[index], expected[key],
                                       saved)
            if fixed is not state[index]:
                state[index] = fixed
                converted = True
            if (optimizer._info.uses_step and "step" not in saved and "step" not in fixed
                    and any(k in fixed for k in optimizer._info.states)):
                raise ValueError(f"{name}: param_groups[{gi}] has no 'step' (the bias-correction step count) but "
                                 f"state[{index!r}] has moments; {_origin(saved)}")
    if not converted:
        return None
    return {**state_dict, "state": state, "param_groups": saved_groups}


def _check_group(optimizer, name: str, gi: int, saved: dict) -> dict:
    """A saved group has every hyperparameter the step reads, and (for algorithms with a step
    counter) a step that ``step()`` will continue rather than restart."""
    later = {k: v for k, v in LATER_GROUP_KEYS.items() if k in optimizer._info.keys and k not in saved}
    if later:
        saved = {**saved, **later}
    missing = [k for k in optimizer._info.keys if k not in saved]
    if missing:
        raise ValueError(f"{name}: param_groups[{gi}] has no {', '.join(map(repr, missing))} "
                         f"({type(optimizer).__name__}'s hyperparameters); {_origin(saved)}")
    if not optimizer._info.uses_step or "step" not in saved:
        return saved
    step = saved["step"]
    count = step_count(step, f"{name}: param_groups[{gi}]['step']")
    if isinstance(step, torch.Tensor) and step.dtype == torch.int32 and step.dim() == 0 and saved.get("setup") \
            and step.device.type == "cpu":
        return saved
    # a step kept as a number or a float tensor, or without optimi's setup flag (which would
    # restart it at 0): optimi's layout, an int32 0-dim tensor
    return {**saved, "step": torch.tensor(count, dtype=torch.int32), "setup": True}


def step_count(step, where: str) -> int:
    """A saved step count as an int (a number or a 1-element real tensor on a device with data),
    or ``ValueError``: a count that is negative, fractional, not finite or past int32 would fail
    or silently change the bias correction at the first step."""
    if isinstance(step, torch.Tensor) and (step.numel() != 1 or step.is_meta or step.is_complex()
                                           or step.dtype == torch.bool) \
            or isinstance(step, bool) or not isinstance(step, (torch.Tensor, int, float)):
        raise ValueError(f"{where} is {step!r}, not a step count")
    value = step.item() if isinstance(step, torch.Tensor) else step
    if not (value == value and abs(value) != float("inf")) or value != int(value) or not 0 <= value < 2 ** 31:
        raise ValueError(f"{where} is {step!r}, not a step count (a whole number in [0, 2**31))")
    return int(value)


def _layout(optimizer, name: str, gi: int, saved_group: dict, param: torch.Tensor) -> dict[str, Any] | None:
    """What ``init_state`` allocates for ``param`` under the saved group: {key: shape or None}."""
    meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
    meta.grad = torch.empty_like(meta)
    out: dict = {}
    try:
        optimizer._info.init_state(out, meta, dict(saved_group), uses_kahan(saved_group, param))
    except KeyError as exc:
        raise ValueError(f"{name}: param_groups[{gi}] has no {exc.args[0]!r}, which {type(optimizer).__name__} "
                         f"reads to allocate its state; {_origin(saved_group)}") from None
    except Exception:  # an init the meta device cannot run: check shapes only
        return None
    return {k: None if v is None else tuple(v.shape) for k, v in out.items()}


def _check_param_state(optimizer, name, gi, position, index, param, st, layout, saved_group) -> dict:
    """The state of one param, checked (``ValueError``) and with optimi's placeholders normalized;
    ``st`` itself when nothing changes."""
    cls = type(optimizer).__name__
    where = f"state[{index!r}] (param_groups[{gi}]['params'][{position}], shape {tuple(param.shape)})"
    if not isinstance(st, dict):
        raise ValueError(f"{name}: {where} is a {type(st).__name__}, not a dict of states")
    shape = tuple(param.shape)
    info = optimizer._info
    known = layout is not None
    if not known:  # allocation rules the meta device cannot run: every present state must fit its param
        layout = {k: shape for k in (*info.states, "kahan_comp") if k in st}
    scales = {quantize.scale_key(k) for k in layout if quantize.is_codes(st.get(k))}  # 8-bit states' block scales
    extra = [k for k in st if k not in layout and k not in ("step", "group") and k not in OPTIMI_TRITON_SCRATCH
             and k not in scales]
    if extra and known:
        raise ValueError(f"{name}: {where} has {', '.join(map(repr, extra))}, which {cls} does not keep "
                         f"(its states: {', '.join(layout)}); {_origin(saved_group)}")
    if "step" in st:  # gradient release keeps a step per param
        step_count(st["step"], f"{name}: {where}: step")
    if not any(k in st for k in layout):
        return st  # never stepped (a gradient release state holds only its group): allocated lazily
    out = st
    for key, want in layout.items():
        if key not in st:
            if key == "kahan_comp":
                continue  # from fp32 training: the first step keeps the moments, the compensation starts at 0
            raise ValueError(f"{name}: {where} has no {key!r} (it has {', '.join(map(repr, st))}); "
                             f"{_origin(saved_group)}")
        value = st[key]
        if value is None:
            if want is not None and key == "kahan_comp":
                # fp32 training's layout loaded for bf16 params: allocated (zero) at the first step
                out = {k: v for k, v in out.items() if k != "kahan_comp"}
            elif want is not None:
                raise ValueError(f"{name}: {where}: {key} is None, but param_groups[{gi}]'s hyperparameters "
                                 f"need it (shape {want})")
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: {where}: {key} is a {type(value).__name__}, not a tensor")
        if quantize.is_codes(value) and quantize.scale_key(key) in st:  # an 8-bit state: codes and block scales
            problem = quantize.check(key, value, st[quantize.scale_key(key)], want if want is not None else shape)
            if problem:
                raise ValueError(f"{name}: {where}: {problem}")
            continue
        if value.is_meta or not value.is_floating_point() and not (want is None and value.numel() == 1):
            what = "on the meta device (it has no data)" if value.is_meta else f"of dtype {value.dtype}"
            raise ValueError(f"{name}: {where}: {key} is {what}; a state must be a floating-point tensor "
                             f"with data (param dtype {param.dtype})")
        got = tuple(value.shape)
        if got == (want if want is not None else shape):
            continue
        if want is None and value.numel() == 1:  # optimi's Triton placeholder for an unused state
            out = {**out, key: None}
            continue
        raise ValueError(f"{name}: {where}: {key} has shape {got}, expected {want if want is not None else shape}")
    scratch = [k for k in OPTIMI_TRITON_SCRATCH if k in st and k not in layout]
    if scratch:
        out = {k: v for k, v in out.items() if k not in scratch}
    return out


def _from_torch_optim(group: dict) -> bool:
    """torch.optim's groups carry keys that optimi's never do, and none of optimi's and ours (``kahan_sum``)."""
    return "kahan_sum" not in group and ("differentiable" in group or "maximize" in group
                                         or ("betas" in group and "beta1" not in group))


def _torch_adam(group: dict) -> bool:
    return _from_torch_optim(group) and "betas" in group and "amsgrad" in group and "beta1" not in group


def _origin(group: dict) -> str:
    if _from_torch_optim(group):
        return ("it is a torch.optim state dict; torch.optim.Adam and AdamW state dicts convert onto optcompile's "
                "Adam and AdamW, and Adadelta, Adagrad, Adamax, RMSprop and Rprop state dicts load into the "
                "optcompile class of the same name")
    return "is it a state dict of another optimizer class?"


def _builtin(optimizer, *names: str) -> bool:
    classes = [getattr(sys.modules.get(f"optcompile.generated.{n.lower()}"), n, None) for n in names]
    return any(c is not None and isinstance(optimizer, c) for c in classes)


def _convert_torch_adam(optimizer, name: str, saved_groups: list, saved_state: dict):
    """torch.optim.Adam/AdamW groups and states in optimi's layout (new containers)."""
    cls = type(optimizer).__name__
    adamw = _builtin(optimizer, "AdamW")
    if not (adamw or _builtin(optimizer, "Adam")):
        raise ValueError(f"{name}: a torch.optim state dict (its groups have 'betas'); only torch.optim.Adam and "
                         f"AdamW state dicts convert, onto optcompile's Adam and AdamW, not {cls}")
    release = optimizer.defaults.get("gradient_release")
    groups, state = [], dict(saved_state)
    for gi, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        if not _torch_adam(saved):
            raise ValueError(f"{name}: param_groups[{gi}] is not a torch.optim Adam group while others are")
        for flag in ("amsgrad",):
            if saved.get(flag):
                raise ValueError(f"{name}: param_groups[{gi}] has {flag}=True (torch.optim), which {cls} does not "
                                 "implement")
        decoupled = saved.get("decoupled_weight_decay")
        if adamw and decoupled is False and saved.get("weight_decay"):
            raise ValueError(f"{name}: param_groups[{gi}] is torch.optim.Adam's (L2 weight decay, "
                             "decoupled_weight_decay=False); load it into optcompile.Adam, or AdamW's decay changes")
        beta1, beta2 = saved["betas"]
        new = {k: v for k, v in saved.items() if k not in TORCH_ONLY_GROUP_KEYS}
        new.update(beta1=beta1, beta2=beta2, decouple_lr=False, max_lr=None)
        if "decouple_wd" in group:
            new["decouple_wd"] = group["decouple_wd"] if adamw or decoupled is None else bool(decoupled)
        for k in BACKEND_KEYS:
            if k in group:
                new[k] = group[k]
        steps = []
        for index in saved["params"]:
            st = saved_state.get(index)
            if not isinstance(st, dict) or "exp_avg" not in st:
                continue
            extra = [k for k in st if k not in ("step", "exp_avg", "exp_avg_sq")]
            if extra or "step" not in st or "exp_avg_sq" not in st:
                raise ValueError(f"{name}: state[{index!r}] is not a torch.optim Adam state (keys "
                                 f"{sorted(map(str, st))}; expected step, exp_avg, exp_avg_sq)")
            t = step_count(st["step"], f"{name}: state[{index!r}]['step']")
            steps.append(t)
            bias1, bias2 = (1 - beta1 ** t, 1 - beta2 ** t) if t > 0 else (1.0, 1.0)
            state[index] = {"exp_avg": st["exp_avg"] / bias1, "exp_avg_sq": st["exp_avg_sq"] / bias2}
            if release:
                state[index]["step"] = torch.tensor(t, dtype=torch.int32)
        # one step per group (optimi's layout): params that missed gradients continue at the group's
        if steps:
            new.update(setup=True, step=torch.tensor(max(steps), dtype=torch.int32))
        else:
            new.update(setup=False)
            new.pop("step", None)
        ordered = {k: new[k] for k in group if k in new}  # this optimizer's key order (its state_dict layout)
        groups.append({**ordered, **new})
    return groups, state


# ── torch.optim's layout (specs with state_dict="torch") ────────────────────────────────────────
def to_torch_layout(optimizer, state_dict: dict) -> dict:
    """state_dict(): torch.optim's layout for a class that is torch.optim's, so that the torch.optim
    class of the same name loads it: tuple hyperparameters under their own name (``betas``), a
    float32 ``step`` per stepped param instead of the group's int32 one, no None states.
    optcompile's own group keys (``kahan_sum``, ``decouple_wd`` …) stay; torch ignores them."""
    info = optimizer._info
    if info.extra.get("state_dict") != "torch":
        return state_dict
    state = dict(state_dict["state"])
    groups = []
    for saved in state_dict["param_groups"]:
        group = dict(saved)
        for arg, keys in info.extra["tuple_keys"].items():
            if all(k in group for k in keys):
                group[arg] = tuple(group.pop(k) for k in keys)
        step = group.pop("step", None)
        group.pop("setup", None)
        count = int(step.item()) if isinstance(step, torch.Tensor) else int(step or 0)
        for index in group["params"]:
            st = state.get(index)
            if not isinstance(st, dict) or not any(st.get(k) is not None for k in info.states):
                continue  # never stepped: torch.optim allocates it lazily too
            own = st.get("step")  # gradient release: a step per param
            new = {k: v for k, v in st.items() if v is not None and k != "step"}
            if info.uses_step:  # not torch.optim.Muon's layout: it keeps no step
                new = {"step": torch.tensor(float(own.item() if isinstance(own, torch.Tensor) else count)), **new}
            state[index] = new
        groups.append(group)
    return {**state_dict, "state": state, "param_groups": groups}


def _from_torch_layout(optimizer, name: str, saved_groups: list, saved_state: dict):
    """torch.optim's layout (``to_torch_layout``, or torch.optim's own state dict) in this
    optimizer's (new containers); a group already in it passes unchanged."""
    info = optimizer._info
    release = optimizer.defaults.get("gradient_release")
    groups, state = [], dict(saved_state)
    for gi, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        for flag in ("capturable", "differentiable"):
            if saved.get(flag):
                raise ValueError(f"{name}: param_groups[{gi}] has {flag}=True (torch.optim), which optcompile "
                                 "does not implement")
        new = {k: v for k, v in saved.items() if k not in ("step", "setup")}
        for arg, keys in info.extra["tuple_keys"].items():
            if arg in new:
                values = new.pop(arg)
                if not isinstance(values, (tuple, list)) or len(values) != len(keys):
                    raise ValueError(f"{name}: param_groups[{gi}][{arg!r}] is {values!r}, expected {len(keys)} values")
                new.update(zip(keys, values))
        for k in TORCH_LAYOUT_EXTRAS:  # optcompile's own keys (decouple_wd, kahan_sum …): this optimizer's
            if k in group and k not in new:
                new[k] = group[k]
        steps = []
        for index in saved["params"]:
            st = saved_state.get(index)
            if not isinstance(st, dict):
                continue
            st = dict(st)
            if "step" in st:
                t = step_count(st.pop("step"), f"{name}: state[{index!r}]['step']")
                steps.append(t)
                if release and info.uses_step:
                    st["step"] = torch.tensor(t, dtype=torch.int32)
            if any(k in st for k in info.states):
                st = {**{k: None for k in info.states}, **st}  # torch allocates no conditional state
            state[index] = st
        if steps and info.uses_step:  # one step per group: params that missed gradients continue at the group's
            new.update(setup=True, step=torch.tensor(max(steps), dtype=torch.int32))
        elif "step" in saved:  # optcompile's own (optimi) layout
            new.update(step=saved["step"], setup=saved.get("setup", True))
        else:
            new["setup"] = False
        groups.append({**{k: new[k] for k in group if k in new}, **new})
    return groups, state
