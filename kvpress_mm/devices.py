"""Is a device string one torch can use on this machine? One check for the `eval` and `bench` commands.

`device_problem(name)` is None for a usable device, else why not, as a phrase that starts with the name
("'cuda' asked for, but this torch (2.5.1+cpu) sees no CUDA device; use device=cpu"); callers put the key
in front. It only asks torch (no tensor is made), so it runs before any model loads.
"""

from __future__ import annotations

DEVICE_TYPES = ("cpu", "cuda", "mps")


def device_problem(name: object, types: tuple[str, ...] = DEVICE_TYPES, key: str = "device") -> str | None:
    """None when `name` is a device of one of `types` that this torch sees, else the reason (one line); `key`:
    the setting the reason suggests a value for ("use model.device=cpu")."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return f"{name!r} is not a torch device (e.g. {', '.join(_examples(types))})"
    if device.type not in types:
        return f"{name!r} is not supported; choose {_choices(types)}"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"{name!r} asked for, but this torch ({torch.__version__}) sees no CUDA device; use {key}=cpu"
        if device.index is not None and device.index >= count:
            return f"{name!r} asked for, but only cuda:0..cuda:{count - 1} exist"
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return f"{name!r} asked for, but this torch ({torch.__version__}) sees no MPS device; use {key}=cpu"
    return None


def _examples(types: tuple[str, ...]) -> list[str]:
    out = []
    for t in types:
        out += ["cuda", "cuda:1"] if t == "cuda" else [t]
    return out


def _choices(types: tuple[str, ...]) -> str:
    names = ["cuda[:N]" if t == "cuda" else t for t in types]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
