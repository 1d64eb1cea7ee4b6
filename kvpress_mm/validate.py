"""Shared validators for configuration fields (strategies, tasks, bench settings).

Every check names the owner (a class name such as "SnapKV", or a label such as "bench"), the field, the
bad value and what is allowed, in one wording:

    SnapKV: window_size must be an integer >= 1, got 0
    RandomEviction: seed must be an integer in [0, 4294967295], got 'a' (str)

Errors:
  * a value of the wrong type (a string where a number is expected, a bool or a float where an integer
    is, None where None is not allowed) raises FieldTypeError, which is both a TypeError and a
    ValueError: `except TypeError` catches exactly the wrong types, and `except ValueError` still
    catches every validation failure (as it did before these checks existed);
  * a value of the right type outside what is allowed (0, nan, inf, -1, an unknown name) raises
    ValueError.
The message of a wrong type also gives the type's name: "got '0.5' (str)".

A field that is set but has no effect in the configuration it is in (`full` given a budget, a
compress_every with phase="prefill", ...) is reported by `warn_ignored`, a UserWarning.

bool is never accepted as a number (True is an int in Python, but `window_size=True` is a mistake), and
integers are never accepted as floats' stand-ins the other way round (4.0 is not an integer field's value).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable, Mapping
from numbers import Integral, Real


class FieldTypeError(TypeError, ValueError):
    """A configuration field was given a value of the wrong type (a TypeError and a ValueError)."""


def is_int(value) -> bool:
    """An integer, not a bool (numpy integers count)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number, not a bool (nan and inf count: the range checks reject them)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def _got(value, wrong_type: bool) -> str:
    return f"got {value!r} ({type(value).__name__})" if wrong_type else f"got {value!r}"


def _fail(owner: str, name: str, allowed: str, value, wrong_type: bool):
    cls = FieldTypeError if wrong_type else ValueError
    return cls(f"{owner}: {name} must be {allowed}, {_got(value, wrong_type)}")


def _bounds(minimum, maximum, low_open: bool = False, high_open: bool = False) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if low_open else '['}{minimum}, {maximum}{')' if high_open else ']'}"
    if minimum is not None:
        return f" {'>' if low_open else '>='} {minimum}"
    if maximum is not None:
        return f" {'<' if high_open else '<='} {maximum}"
    return ""


def check_int(owner: str, name: str, value, minimum=None, maximum=None, allow_none: bool = False):
    """`value` if it is an integer in [minimum, maximum] (either bound optional) or an allowed None."""
    if value is None and allow_none:
        return value
    allowed = f"an integer{_bounds(minimum, maximum)}" + (" or None" if allow_none else "")
    if not is_int(value):
        raise _fail(owner, name, allowed, value, wrong_type=True)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(owner, name, allowed, value, wrong_type=False)
    return value


def check_number(
    owner: str,
    name: str,
    value,
    minimum=None,
    maximum=None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    hint: str = "",
):
    """`value` if it is a finite real number within the bounds (open or closed, either optional).

    nan and the infinities are always refused; `hint` is added after the range ("(0, 1] (fraction of
    prompt tokens kept)").
    """
    if value is None and allow_none:
        return value
    allowed = f"a number{_bounds(minimum, maximum, low_open, high_open)}"
    if hint:
        allowed += f" ({hint})"
    if allow_none:
        allowed += " or None"
    if not is_number(value):
        raise _fail(owner, name, allowed, value, wrong_type=True)
    x = float(value)
    bad = not math.isfinite(x)
    if minimum is not None:
        bad = bad or (x <= minimum if low_open else x < minimum)
    if maximum is not None:
        bad = bad or (x >= maximum if high_open else x > maximum)
    if bad:
        raise _fail(owner, name, allowed, value, wrong_type=False)
    return value


def check_fraction(
    owner: str,
    name: str,
    value,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    hint: str = "",
):
    """`value` if it is a number in [0, 1] (each end open on request: low_open gives (0, 1])."""
    return check_number(owner, name, value, 0, 1, low_open, high_open, allow_none, hint)


def check_choice(owner: str, name: str, value, choices: Iterable):
    """`value` if it is one of `choices` (a wrong type, e.g. 3 among strings, is a FieldTypeError)."""
    choices = tuple(choices)
    try:
        ok = value in choices
    except TypeError:  # a value whose == refuses the comparison
        ok = False
    if ok:
        return value
    wrong_type = bool(choices) and not any(isinstance(value, type(c)) for c in choices)
    allowed = ", ".join(str(c) for c in choices)
    cls = FieldTypeError if wrong_type else ValueError
    raise cls(f"{owner}: {name} must be one of {allowed}; {_got(value, wrong_type)}")


def check_bool(owner: str, name: str, value):
    """`value` if it is True or False (not 0, 1 or "true")."""
    if not isinstance(value, bool):
        raise _fail(owner, name, "true or false", value, wrong_type=True)
    return value


def check_str(owner: str, name: str, value, what: str = "a string", allow_none: bool = False):
    """`value` if it is a string (non-empty), or an allowed None."""
    if value is None and allow_none:
        return value
    allowed = what + (" or None" if allow_none else "")
    if not isinstance(value, str):
        raise _fail(owner, name, allowed, value, wrong_type=True)
    if not value:
        raise _fail(owner, name, allowed, value, wrong_type=False)
    return value


def check_mapping(owner: str, name: str, value, what: str = "a mapping of field names to values"):
    """`value` if it is a mapping (dict, OmegaConf DictConfig) whose keys are strings."""
    if not isinstance(value, Mapping):
        raise _fail(owner, name, what, value, wrong_type=True)
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise FieldTypeError(f"{owner}: {name} must be {what} (string keys), got key {bad[0]!r} in {dict(value)!r}")
    return value


# frames of these modules are skipped so that a warning points at the caller's line
_INTERNAL_MODULES = ("kvpress_mm", "dataclasses", "copy", "hydra", "omegaconf")


def _caller_stacklevel() -> int:
    """stacklevel for warnings.warn called in this module: the first frame outside the library."""
    frame, level = sys._getframe(2), 2  # 1: warnings.warn's caller (this module), 2: its caller
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] not in _INTERNAL_MODULES:
            return level
        frame, level = frame.f_back, level + 1
    return 2


def warn_ignored(owner: str, name: str, value, reason: str) -> None:
    """UserWarning: field `name` is set to `value` but has no effect (`reason` says why)."""
    warnings.warn(f"{owner}: {name}={value!r} is ignored: {reason}", UserWarning, stacklevel=_caller_stacklevel())
