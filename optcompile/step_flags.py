"""The two switches every generated step takes besides the spec's hyperparameters, named once
(no sympy: the runtime passes them): the passes guard statements by them, every printer takes
them as host inputs, and the runtime sets them per step."""
from __future__ import annotations

UPDATE_PARAMETERS = "update_parameters"  # false while gradients are only accumulated (optimizer_accumulation)
KAHAN = "kahan"  # Kahan summation is on: kahan_sum and a low-precision param
STEP_FLAGS = (UPDATE_PARAMETERS, KAHAN)  # in the order the generated host function takes them


def step_flags(*, optimizer_accumulation: bool, kahan: bool) -> dict[str, bool]:
    """The flags' values for one step, by name, for the generated host function."""
    return {UPDATE_PARAMETERS: not optimizer_accumulation, KAHAN: kahan}
