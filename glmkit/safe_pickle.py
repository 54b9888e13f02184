"""Read a torch checkpoint that holds objects of classes glmkit does not have, without running its code.

Training checkpoints (Adept's `model_optim_rng.pt`) pickle more than tensors: the training arguments,
optimizer and RNG state, some of them instances of the trainer's own classes. Unpickling those normally
imports the trainer's library and runs whatever the pickle names. Here torch's weights_only unpickler reads
the file, and every global it does not already allow becomes an `InertObject` subclass that only records
what the pickle gave it; nothing outside torch's allowlist is imported, and nothing the pickle names runs.

A global that looks like a function (its name does not start with a capital letter, as classes' do) is
refused with `UnsafePickleError` before anything is unpickled: a `__reduce__` calling `os.system` never
runs. A capitalised callable (`subprocess.Popen`) is not imported either: it becomes an inert record.
The only lower-case names accepted are numpy's array constructors (RNG state holds numpy arrays), which
become inert records too.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, ClassVar

import torch

from .checkpoint import CheckpointError

# numpy names an RNG state pickles with (classes and reconstructors with lower-case names): inert here too
INERT_LOWERCASE = frozenset(
    f"{prefix}.{name}"
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
) | {"numpy.ndarray", "numpy.dtype"}


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle would call a function (e.g. a `__reduce__` naming os.system); it was not unpickled."""


class InertObject:
    """Stands in for an object of a class that is not imported: `args` are what the pickle passed to the
    class, `state` what it set on the instance (a dict of fields for a plain object). Runs nothing."""

    pickled_name: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def fields(self) -> dict[str, Any]:
        """The instance's attributes when the pickle stored them as a dict (argparse.Namespace and the like)."""
        state = self.state[0] if isinstance(self.state, tuple) and self.state else self.state
        return dict(state) if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<inert {self.pickled_name}>"


def _placeholder(name: str) -> type[InertObject]:
    module, _, qualname = name.rpartition(".")
    return type(qualname, (InertObject,), {"pickled_name": name, "__module__": module or "?"})


def load_inert(path: str | os.PathLike) -> Any:
    """torch.load(path) with weights_only=True and memory mapping, unknown classes replaced by InertObject
    subclasses; raises UnsafePickleError naming the first global that would be called as a function."""
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError) as err:  # not a zip checkpoint (the pre-1.6 format, or not torch's at all)
        raise CheckpointError(f"cannot read {path} as a torch checkpoint (zip format): {err}") from err
    for name in unknown:
        last = name.rpartition(".")[2]
        if name not in INERT_LOWERCASE and not last[:1].isupper():
            raise UnsafePickleError(
                f"{path} asks to call {name} while unpickling (arbitrary code); refused, nothing was executed"
            )
    with torch.serialization.safe_globals([(_placeholder(name), name) for name in unknown]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
