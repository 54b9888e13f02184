"""Several devices in one process: `from_pretrained(..., device_map="auto" | "balanced" | "sequential" | {name:
device}, max_memory={device: bytes})` places the embedding, each decoder layer and the final norm / head on a
device (pipeline-style, as the reference's accelerate integration does) and moves each module's inputs to it.

Applied from outside the model (DESIGN rule 4): modules are placed whole and a forward pre-hook per placed module
moves its tensor inputs (hidden states, masks, rotary tables) to its device. The KV cache follows: each layer's
buffers are allocated next to that layer's keys, the per-row state stays on the first device. Logits come back on
the head's device; the decode loop brings them to the tokens' device.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .cache import Cache
from .checkpoint import check_device_available, parse_size

STRATEGIES = ("auto", "balanced", "sequential")


class DeviceMapError(ValueError):
    """A device_map / max_memory that cannot place this model (names, devices or sizes)."""


def wants_placement(device_map: Any, max_memory: dict | None) -> bool:
    """True when device_map asks for a per-module plan over several devices; False keeps the whole model on one
    device (no map, one device, `{"": device}`, or "auto" on a machine with a single device)."""
    if isinstance(device_map, dict):
        return set(device_map) != {""}
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return max_memory is not None or torch.cuda.device_count() > 1
    if max_memory is not None:
        raise DeviceMapError('max_memory is used with device_map="auto", "balanced" or "sequential"')
    return False


def as_device(spec: int | str | torch.device) -> torch.device:
    """An index (CUDA), "cpu", "cuda:1", "mps" or a torch.device that this machine has."""
    if isinstance(spec, bool):
        raise DeviceMapError(f"not a device: {spec!r}")
    if spec == "disk":
        raise DeviceMapError("glmkit does not offload weights to disk: place every module on a device")
    try:
        device = torch.device("cuda", spec) if isinstance(spec, int) else torch.device(spec)
    except (RuntimeError, TypeError):
        raise DeviceMapError(f"not a device: {spec!r}") from None
    check_device_available(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def placement_units(model: nn.Module) -> list[str]:
    """The modules placed whole, in forward order: each child of the model, except that the base model and
    any ModuleList are opened up (so `model.embed_tokens`, `model.layers.0`, …, `model.norm`, `lm_head`)."""

    def walk(module: nn.Module, prefix: str) -> Iterator[str]:
        for name, child in module.named_children():
            full = prefix + name
            if isinstance(child, nn.ModuleList):
                yield from (f"{full}.{i}" for i in range(len(child)))
            elif any(isinstance(m, nn.ModuleList) for m in child.modules()):
                yield from walk(child, full + ".")
            else:
                yield full

    return list(walk(model, ""))


def unit_sizes(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of each unit's parameters and buffers once loaded in `dtype` (a tied weight counted once, with
    the first unit that holds it)."""
    seen: set[int] = set()
    sizes = {}
    for name in placement_units(model):
        module = model.get_submodule(name)
        fresh = [t for t in (*module.parameters(), *module.buffers()) if id(t) not in seen]
        seen.update(id(t) for t in fresh)
        sizes[name] = sum(_tensor_bytes(t, dtype) for t in fresh)
    return sizes


def mean_leaf_size(model: nn.Module, dtype: torch.dtype) -> int:
    """Mean bytes of the modules that hold weights themselves and have no such submodule (linears, norms,
    embeddings): part of the reference's margin for a balanced split."""
    leaves = [m for m in model.modules() if _nbytes(m, dtype, recurse=False) and
              not any(_nbytes(c, dtype) for c in m.children())]  # fmt: skip
    return sum(_nbytes(m, dtype) for m in leaves) // max(len(leaves), 1)


def _nbytes(module: nn.Module, dtype: torch.dtype, recurse: bool = True) -> int:
    return sum(_tensor_bytes(t, dtype) for t in (*module.parameters(recurse), *module.buffers(recurse)))


def _tensor_bytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes once loaded: floating tensors arrive in the target dtype, others as stored."""
    return t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())


def _tied_to(model: nn.Module, units: list[str]) -> dict[str, str]:
    """unit -> the earlier unit it shares a parameter with (a tied lm_head goes where its embedding is)."""
    owner: dict[int, str] = {}
    tied = {}
    for name in units:
        for p in model.get_submodule(name).parameters():
            if id(p) in owner and owner[id(p)] != name:
                tied[name] = owner[id(p)]
            owner.setdefault(id(p), name)
    return tied


def plan_device_map(model: nn.Module, device_map: str | dict, dtype: torch.dtype,
                    max_memory: dict | None = None) -> dict[str, torch.device]:  # fmt: skip
    """unit name -> device for a model built on the meta device (names as `placement_units` gives them)."""
    units = placement_units(model)
    if isinstance(device_map, dict):
        plan = _explicit_plan(units, device_map)
    else:
        sizes = unit_sizes(model, dtype)
        limits = _limits(max_memory)
        if not limits:
            raise DeviceMapError("max_memory names no device to place the model on")
        if device_map == "sequential":
            plan = _sequential(units, sizes, limits)
        else:
            plan = _balanced(units, sizes, limits, mean_leaf_size(model, dtype))
    for unit, owner in _tied_to(model, units).items():
        plan[unit] = plan[owner]
    return plan


def _limits(max_memory: dict | None) -> dict[torch.device, int]:
    """max_memory as {device: bytes}; without it 90 % of the free memory of every visible CUDA device."""
    if max_memory is None:
        count = torch.cuda.device_count()
        return {torch.device("cuda", i): int(0.9 * torch.cuda.mem_get_info(i)[0]) for i in range(count)}
    limits = {}
    for key, size in max_memory.items():
        try:
            limits[as_device(key)] = parse_size(size)
        except (TypeError, ValueError) as e:
            if isinstance(e, DeviceMapError):
                raise
            raise DeviceMapError(f"max_memory[{key!r}] = {size!r}: {e}") from None
    return limits


def _sequential(units: list[str], sizes: dict[str, int], limits: dict[torch.device, int]) -> dict[str, torch.device]:
    """Fill the first device up to its max_memory, then the next, in forward order."""
    devices, plan, used, d = list(limits), {}, 0, 0
    for name in units:
        while used + sizes[name] > limits[devices[d]]:
            d, used = d + 1, 0
            if d == len(devices):
                need = sum(sizes.values())
                raise DeviceMapError(
                    f"the model ({need / 2**20:.1f} MiB) does not fit max_memory "
                    f"({', '.join(f'{dev}: {lim / 2**20:.1f} MiB' for dev, lim in limits.items())}): "
                    f"{name} ({sizes[name] / 2**20:.1f} MiB) and the modules after it have no room"
                )
        plan[name], used = devices[d], used + sizes[name]
    return plan


def _balanced(units: list[str], sizes: dict[str, int], limits: dict[torch.device, int],
              leaf_mean: int) -> dict[str, torch.device]:  # fmt: skip
    """The reference's "balanced" (accelerate's get_balanced_memory): every device but the last gets a budget of
    its share of the total plus 1.25 x the larger of the biggest layer and the mean leaf module (so a layer that
    straddles a boundary still fits), capped by its max_memory; then the devices are filled in order."""
    devices = list(limits)
    layers = [sizes[u] for u in sizes if u.rsplit(".", 1)[-1].isdigit()]  # the decoder layers (ModuleList items)
    margin = int(1.25 * max(max(layers, default=0), leaf_mean))
    budget = sum(sizes.values()) // len(devices) + margin
    capped = {d: min(budget, limits[d]) for d in devices[:-1]}
    return _sequential(units, sizes, {**capped, devices[-1]: limits[devices[-1]]})


def _explicit_plan(units: list[str], device_map: dict) -> dict[str, torch.device]:
    """The user's map: each unit takes the device of the longest key that is it or contains it."""
    devices = {key: as_device(value) for key, value in device_map.items()}
    unknown = [k for k in devices if k and not any(u == k or u.startswith(k + ".") for u in units)]
    if unknown:
        finer = [k for k in unknown if any(k.startswith(u + ".") for u in units)]
        hint = f" ({', '.join(finer)}: glmkit places whole layers)" if finer else ""
        raise DeviceMapError(f"device_map names modules this model does not have: {', '.join(unknown)}{hint}; "
                             f"its modules are {units[0]}, …, {units[-1]}")  # fmt: skip
    plan, unplaced = {}, []
    for unit in units:
        keys = [k for k in devices if k == "" or unit == k or unit.startswith(k + ".")]
        if keys:
            plan[unit] = devices[max(keys, key=len)]
        else:
            unplaced.append(unit)
    if unplaced:
        raise DeviceMapError(f"device_map leaves modules unplaced: {', '.join(unplaced)}")
    return plan


def device_of(plan: dict[str, torch.device], name: str) -> torch.device:
    """The device of parameter / buffer `name` under the plan."""
    unit = name
    while unit not in plan:
        if "." not in unit:
            raise KeyError(name)
        unit = unit.rsplit(".", 1)[0]
    return plan[unit]


def dispatch(model: nn.Module, plan: dict[str, torch.device], device_map: str | dict) -> nn.Module:
    """Place every unit on its device, hook it to move its inputs there, and record `model.hf_device_map` as the
    reference does: the caller's dict as given, or a planned map where a module whose parts share one device
    is named once."""
    for name, device in plan.items():
        module = model.get_submodule(name).to(device)
        if any(True for _ in (*module.parameters(), *module.buffers())):  # (a weightless one, e.g. the rotary
            module.register_forward_pre_hook(_mover(device), with_kwargs=True)  # tables, runs where called)
    reported = {name: _reported(device) for name, device in plan.items()}
    model.hf_device_map = dict(device_map) if isinstance(device_map, dict) else _merged(reported)
    return model


def _merged(device_map: dict[str, Any], module: str = "") -> dict[str, Any]:
    """{"model.layers.0": 0, "model.layers.1": 0, …} -> {"model.layers": 0, …} where every part of a module
    is on the same device (accelerate's clean_device_map), from the whole model down."""
    prefix = module + "." if module else ""
    inside = [k for k in device_map if k.startswith(prefix)]
    values = {device_map[k] for k in inside}
    if len(values) == 1 and len(inside) > 1:
        for k in inside:
            del device_map[k]
        device_map[module] = values.pop()
    depth = module.count(".") + 2 if module else 1
    children = {".".join(k.split(".")[:depth]) for k in device_map if k.startswith(prefix) and len(k) > len(module)}
    for child in sorted(children):
        _merged(device_map, child)
    return device_map


def spans_devices(model: nn.Module) -> bool:
    """A model placed over several devices (compile and CUDA graphs are refused for it)."""
    return len(set(getattr(model, "hf_device_map", {}).values())) > 1


def _reported(device: torch.device) -> int | str:
    """The reference's hf_device_map values: a CUDA index, else the device type ("cpu", "mps")."""
    return device.index if device.type == "cuda" else str(device)


def _mover(device: torch.device):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return moved(args, device), moved(kwargs, device)

    return hook


def moved(obj: Any, device: torch.device) -> Any:
    """obj with its tensors on `device`: tensors, tuples, lists, dicts and small objects holding tensors
    (rotary tables, flash masks, encoder inputs) as copies; caches and modules pass as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        items = [moved(o, device) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return {k: moved(v, device) for k, v in obj.items()}
    if isinstance(obj, (Cache, nn.Module)) or not hasattr(obj, "__dict__"):
        return obj
    tensors = {k: v for k, v in vars(obj).items() if isinstance(v, torch.Tensor) and v.device != device}
    if not tensors:
        return obj
    out = copy.copy(obj)
    for k, v in tensors.items():
        setattr(out, k, v.to(device))
    return out
