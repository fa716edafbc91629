"""The switches every generated step takes besides the spec's hyperparameters, named once
(no sympy: the runtime passes them): the passes guard statements by them, every printer takes
them as host inputs, and the runtime sets them per step. A spec with views (``spec.eval_view``)
also takes the two view switches: a call with one of them on writes that view into the params
instead of stepping (``optimizer.eval()``/``train()``); they default to off."""
from __future__ import annotations

UPDATE_PARAMETERS = "update_parameters"  # false while gradients are only accumulated (optimizer_accumulation)
KAHAN = "kahan"  # Kahan summation is on: kahan_sum and a low-precision param
VIEW_EVAL = "view_eval"  # write the eval view into the params (optimizer.eval()), nothing else
VIEW_TRAIN = "view_train"  # write the training view back (optimizer.train()), nothing else
VIEW_FLAGS = (VIEW_EVAL, VIEW_TRAIN)
STEP_FLAGS = (UPDATE_PARAMETERS, KAHAN, *VIEW_FLAGS)  # in the order the generated host function takes them


def step_flags(*, optimizer_accumulation: bool, kahan: bool) -> dict[str, bool]:
    """The flags' values for one step, by name, for the generated host function."""
    return {UPDATE_PARAMETERS: not optimizer_accumulation, KAHAN: kahan}


def view_flags(view: str) -> dict[str, bool]:
    """The view switches of a call that writes view ``view`` ("eval" or "train") into the params."""
    return {VIEW_EVAL: view == "eval", VIEW_TRAIN: view == "train"}
