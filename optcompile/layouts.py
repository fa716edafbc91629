"""Remembering that a step's buffers passed their checks: the layout of every tensor in each
buffer list (dtype, device, sizes, strides, requires_grad), compared in C++.

Every step checks that each grad and state has its param's shape (and, for the fused kernel, that
each tensor is contiguous, CPU and of the param's dtype). In Python that is a pass over the tensors
per property, ~0.1–0.3 µs a tensor each, the most expensive part of a fused step over many small
tensors. A training loop's buffers keep their layout from step to step (fresh gradients included),
so after the Python checks pass once, the layout is recorded in torch's ``TensorGuards`` (what
``torch.compile`` checks its inputs with) and later steps compare against it in one C++ loop
(~0.08 µs a tensor, all properties at once). Any difference (a param resized or reshaped, a state
replaced or loaded, another dtype or device) misses, and the Python checks run again: the record
can only skip checks that passed on exactly this layout.

``TensorGuards`` is private to torch; if it is missing or does not behave as tested at import,
nothing is recorded and every step runs the Python checks.

A layout says nothing about *which* memory a tensor holds (``p.data = other`` and ``set_()`` keep
it): whoever skips checks by a layout still reads every data pointer afresh. ``DICT_VERSION``
tells that a dict has not been mutated since it was last seen (CPython's per-dict version tag,
read by torch's guards), so a fused step can tell that ``optimizer.state`` still holds the same
state tensors without looking each of them up; ``None`` where it is unavailable (then they are
looked up and compared by identity every step).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

MISSING = object()
MIN_TENSORS = 32  # fewer tensors: the Python checks cost less than a lookup (gradient release steps one)


def guard(tensors):
    """A record of the layout of ``tensors``: ``guard(a).check(*b)`` is True iff every tensor of
    ``b`` has the layout (dtype, device, sizes, strides, requires_grad, dispatch keys) of ``a``'s."""
    from torch._C._dynamo.guards import TensorGuards
    return TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                        dynamic_dims_strides=[list(t.stride()) for t in tensors])


def _guards_work() -> bool:
    """The properties this module relies on, tested on this torch: same layout passes (other
    tensors, too); another size, dtype, stride or device fails; None and a sparse tensor fail."""
    try:
        a = [torch.zeros(3), torch.zeros(2, 2)]
        g = guard(a)
        return bool(g.check(*a) and g.check(torch.ones(3), torch.ones(2, 2))
                    and not g.check(torch.zeros(4), a[1]) and not g.check(a[0], torch.zeros(4, 1))
                    and not g.check(a[0], torch.zeros(1, 4)) and not g.check(a[0].double(), a[1])
                    and not g.check(a[0], torch.zeros(2, 2).t()) and not g.check(a[0], None)
                    and not g.check(torch.zeros(3, device="meta"), a[1])
                    and not g.check(torch.zeros(3).to_sparse(), a[1]))
    except Exception:
        return False


AVAILABLE = _guards_work()


def _dict_version():
    """torch's reader of CPython's dict version tag, if it behaves as relied on here: every
    mutation (insert, replace, delete, clear, update) changes it; reading does not."""
    try:
        from torch._C._dynamo.guards import dict_version
        d: dict = {"a": 1}
        seen = [dict_version(d)]
        for change in (lambda: d.__setitem__("a", 2), lambda: d.__setitem__("b", 1), lambda: d.pop("b"),
                       lambda: d.update(a=3), lambda: d.setdefault("c", 1), lambda: d.clear()):
            d.get("a")
            if dict_version(d) != seen[-1]:
                return None  # reading changed it
            change()
            seen.append(dict_version(d))
        return dict_version if len(set(seen)) == len(seen) else None
    except Exception:
        return None


DICT_VERSION = _dict_version()


class LayoutCache:
    """Values stored under the layouts of lists of buffers (``[params, grads, *states, kahan]``).

    Entries are keyed by the first param (its identity: a param group's, stable across steps),
    the number of tensors and which lists are absent (all None); lists with some None are never
    recorded. A layout is recorded the second time its key misses, so calls that never repeat (the
    functional form over fresh tensors) never pay for building a record (~2.5 µs a tensor).
    The identity only selects candidates: a hit always means the layouts are equal.
    """

    def __init__(self, per_key: int = 4, keys: int = 256):
        self.per_key, self.keys = per_key, keys
        self._entries: OrderedDict = OrderedDict()
        self._seen: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(lists, n: int):
        return (id(lists[0][0]), n,
                tuple(lst[0] is None and lst[-1] is None and lst.count(None) == n for lst in lists))

    def get(self, lists) -> Any:
        """The value stored for this exact layout, or ``MISSING``."""
        n = len(lists[0])
        if not AVAILABLE or n < MIN_TENSORS:
            return MISSING
        key = self._key(lists, n)
        entries = self._entries.get(key)
        if not entries:
            return MISSING
        for i, entry in enumerate(list(entries)):
            guards, value = entry
            if all([g is None or g.check(*lst) for g, lst in zip(guards, lists)]):
                if i:  # most recent first: the next step of this group finds it at once
                    with self._lock:
                        if entry in entries:
                            entries.remove(entry)
                            entries.insert(0, entry)
                return value
        return MISSING

    def put(self, lists, value: Any) -> None:
        """Record the layout of ``lists`` (which just passed the checks that ``value`` states)."""
        n = len(lists[0])
        if not AVAILABLE or n < MIN_TENSORS:
            return
        key = self._key(lists, n)
        with self._lock:
            if key not in self._entries and key not in self._seen:
                self._seen[key] = None  # first miss: record if it comes back
                while len(self._seen) > self.keys:
                    self._seen.popitem(last=False)
                return
        if any(not none and any([t is None for t in lst]) for none, lst in zip(key[2], lists)):
            return
        try:
            entry = ([None if none else guard(lst) for none, lst in zip(key[2], lists)], value)
        except Exception:  # a tensor the guards cannot record (a subclass): just check every step
            return
        with self._lock:
            self._seen.pop(key, None)
            found = self._entries.setdefault(key, [])
            found.insert(0, entry)
            del found[self.per_key:]
            self._entries.move_to_end(key)
            while len(self._entries) > self.keys:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._seen.clear()
