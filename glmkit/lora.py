"""LoRA and QLoRA adapters as a module swap from outside the model, saved and loaded in the PEFT format.

`apply(model, rank=8, alpha=16, target_modules=["q_proj", "v_proj"])` replaces each targeted linear
(`nn.Linear`, or the int8 / int4 linears of glmkit.quant: QLoRA) by a `LoraLinear` that keeps the frozen
base as `base_layer` and adds `scaling * B(A(dropout(x)))` in float. Module names stay the checkpoint's
(`model.layers.0.self_attn.q_proj`), so the adapter's tensors are PEFT's keys with the
`base_model.model.` prefix: `save_adapter` writes `adapter_config.json` + `adapter_model.safetensors`
that `peft.PeftModel.from_pretrained(transformers_model, DIR)` loads, and `load_adapter` reads PEFT's.
`merge(model)` folds the adapters into plain `nn.Linear` weights (a checkpoint any loader reads).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import Linear
from .quant import Int4Linear, Int8Linear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the transformers model
ALL_LINEAR = ("all", "all-linear")
QUANTIZED = (Int8Linear, Int4Linear)
_PEFT_FEATURES_WE_LACK = {  # adapter_config keys whose non-default value changes the math we implement
    "use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
    "layers_to_transform": None, "layers_pattern": None, "lora_bias": False, "target_parameters": None,
}  # fmt: skip


class AdapterError(ValueError):
    """An adapter that does not fit the model (other architecture, shapes, targets) or a format we do not read."""


@dataclass
class LoraConfig:
    """The adapter_config.json fields glmkit writes and reads (a subset of PEFT's LoraConfig)."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module-name regex -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    def to_peft_dict(self) -> dict[str, Any]:
        """What PEFT's LoraConfig.from_pretrained expects (its other fields at their defaults)."""
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": True, "r": self.r,
            "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules, "use_rslora": self.use_rslora,
            "rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern,
            "base_model_name_or_path": self.base_model_name_or_path, "init_lora_weights": True,
            **_PEFT_FEATURES_WE_LACK,
        }  # fmt: skip

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], source: str) -> LoraConfig:
        """Read PEFT's adapter_config.json; a feature that would change the math and that we lack is an error."""
        if d.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{source}: peft_type {d.get('peft_type')!r} is not supported (LORA only)")
        for key, default in _PEFT_FEATURES_WE_LACK.items():
            if d.get(key, default) not in (default, [], {}) and not (key == "use_dora" and d[key] is None):
                raise AdapterError(f"{source}: {key}={d[key]!r} is not supported by glmkit's LoRA")
        names = [f.name for f in cls.__dataclass_fields__.values()]
        return cls(**{k: d[k] for k in names if d.get(k) is not None})

    def rank_and_scaling(self, module_name: str) -> tuple[int, float]:
        """PEFT's per-module rank / alpha (the first pattern matching the end of the name wins)."""
        rank = next((v for k, v in self.rank_pattern.items() if _pattern_matches(k, module_name)), self.r)
        alpha = next((v for k, v in self.alpha_pattern.items() if _pattern_matches(k, module_name)), self.lora_alpha)
        return rank, alpha / (math.sqrt(rank) if self.use_rslora else rank)


def _pattern_matches(pattern: str, name: str) -> bool:
    return re.match(rf"(.*\.)?{pattern}$", name) is not None


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """y = quantized_linear(x), with dx = dy @ W (W dequantized in backward): the int8 / int4 kernels have no
    derivative, and QLoRA needs the gradient to flow through the frozen base to the adapters below it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base = base
        return base(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight = ctx.base.dequantized_weight().to(grad.dtype)  # (N, K)
        return grad @ weight, None


class LoraLinear(nn.Module):
    """base_layer(x) + scaling * lora_B(lora_A(dropout(x))). A starts Kaiming-uniform and B at zero (PEFT's
    init), so a fresh adapter leaves the output unchanged; the adapter computes in its own (float) dtype."""

    def __init__(self, base_layer: nn.Module, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base_layer, self.rank, self.scaling = base_layer, rank, scaling
        weight = base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else _quantized_dtype(base_layer)
        device = weight.device if weight.device.type != "meta" else None
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base_layer, QUANTIZED) and torch.is_grad_enabled() and x.requires_grad:
            y = _FrozenQuantizedMatmul.apply(x, self.base_layer)
        else:
            y = self.base_layer(x)
        a = self.lora_A.weight
        return y + (self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain linear (glmkit's `Linear`) with the adapter folded in (a quantized base is dequantized first)."""
        base = self.base_layer
        float_weight = base.weight if isinstance(base, nn.Linear) else base.dequantized_weight()
        dtype = self.lora_A.weight.dtype
        linear = Linear(self.in_features, self.out_features, bias=base.bias is not None, dtype=dtype,
                        device=self.lora_A.weight.device)  # fmt: skip
        with torch.no_grad():
            linear.weight.copy_(float_weight.to(dtype) + self.delta_weight())
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def _quantized_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a quantized linear computes in (its scales' dtype)."""
    scales = getattr(module, "scales", None)
    return (scales if scales is not None else module.scales_and_zeros).dtype


# ---- applying -----------------------------------------------------------------------------------------


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, *QUANTIZED))]


def select_targets(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """PEFT's matching: a list matches a module whose name is an entry or ends with "." + entry; a string is a
    regex matched against the full name; "all" / "all-linear" is every linear but the output head."""
    linears = _linear_names(model)
    if isinstance(target_modules, str) and target_modules in ALL_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = [n for n in linears if model.get_submodule(n) is not head and n != "lm_head"]
    elif isinstance(target_modules, str):
        chosen = [n for n in linears if re.fullmatch(target_modules, n)]
    else:
        wanted = list(target_modules)
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in wanted)]
        unused = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in linears)]
        if unused:
            raise AdapterError(f"target module(s) {', '.join(unused)} match no linear layer of {type(model).__name__}; "
                               f"its linear layers are named: {_short_names(linears)}")  # fmt: skip
    if not chosen:
        raise AdapterError(f"target_modules {target_modules!r} match no linear layer of {type(model).__name__}; "
                           f"its linear layers are named: {_short_names(linears)}")  # fmt: skip
    return chosen


def _short_names(names: Iterable[str]) -> str:
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))


def apply(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
    *,
    config: LoraConfig | None = None,
) -> nn.Module:
    """Swap LoRA into `model` in place and freeze everything else; returns the model.

    `config` (a LoraConfig, e.g. read from an adapter directory) overrides the keyword arguments.
    """
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise AdapterError(f"{type(model).__name__} already has LoRA adapters (merge() them first)")
    if config is None:
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        targets = "all-linear" if targets in ALL_LINEAR else targets  # PEFT's spelling
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    if not 0 <= config.lora_dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {config.lora_dropout}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in select_targets(model, config.target_modules):
        rank_here, scaling = config.rank_and_scaling(name)
        model.set_submodule(name, LoraLinear(model.get_submodule(name), rank_here, scaling, config.lora_dropout))
    model.lora_config = config
    return model


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's saved key names."""
    state = {}
    for name, module in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            state[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(module, part).weight.detach().contiguous()
    if not state:
        raise AdapterError(f"{type(model).__name__} has no LoRA adapters to save (call glmkit.lora.apply first)")
    return state


# ---- saving / loading ---------------------------------------------------------------------------------


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors (PEFT's layout and key names)."""
    state = adapter_state_dict(model)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config: LoraConfig = model.lora_config
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = str(base_model_name_or_path)
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config.to_peft_dict(), indent=2) + "\n", encoding="utf-8")


def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an adapter directory (safetensors; a PEFT .bin is read without unpickling code)."""
    path = Path(directory)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}: not a PEFT adapter directory")
    try:
        config_dict = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path / CONFIG_FILE}: not valid JSON ({e.msg})") from None
    config = LoraConfig.from_peft_dict(config_dict, str(path / CONFIG_FILE))
    if (path / WEIGHTS_FILE).is_file():
        state = load_file(str(path / WEIGHTS_FILE))
    elif (path / "adapter_model.bin").is_file():
        state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {WEIGHTS_FILE} (or adapter_model.bin) in {path}")
    return config, state


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Apply the PEFT adapter in `directory` to `model` (in place): its targets, ranks and weights. Raises
    AdapterError when it was made for another architecture or other shapes, before changing anything."""
    config, state = read_checked_adapter(model, directory)
    apply(model, config=config)
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            for part in ("lora_A", "lora_B"):
                weight = getattr(module, part).weight
                weight.copy_(state[f"{PEFT_PREFIX}{name}.{part}.weight"].to(weight.dtype))
    return model


def read_checked_adapter(model: nn.Module, directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """read_adapter, then check that the adapter fits `model`: only LoRA tensors, of linears it has, of the
    shapes its config says, for every module its targets select."""
    config, state = read_adapter(directory)
    names = {k.removeprefix(PEFT_PREFIX) for k in state}
    odd = sorted(n for n in names if not re.search(r"\.lora_[AB]\.weight$", n))
    if odd:
        raise AdapterError(f"{directory}: tensors glmkit's LoRA does not read: {', '.join(odd[:5])}")
    linears = set(_linear_names(model))
    foreign = sorted({n.rsplit(".", 2)[0] for n in names} - linears)
    if foreign:
        raise AdapterError(f"{directory} was made for another architecture: {type(model).__name__} has no linear "
                           f"layer {', '.join(foreign[:5])}")  # fmt: skip
    _check_shapes(model, config, state, directory)
    parts = [f"{PEFT_PREFIX}{n}.{part}.weight" for n in select_targets(model, config.target_modules)
             for part in ("lora_A", "lora_B")]  # fmt: skip
    missing = [k for k in parts if k not in state]
    if missing:
        raise AdapterError(f"{directory}: adapter weights missing for {', '.join(missing[:5])}")
    return config, state


def _check_shapes(model: nn.Module, config: LoraConfig, state: dict[str, torch.Tensor], directory: Any) -> None:
    wrong = []
    for key, tensor in state.items():
        module_name, part = key.removeprefix(PEFT_PREFIX).rsplit(".", 2)[:2]
        base = model.get_submodule(module_name)
        rank, _ = config.rank_and_scaling(module_name)
        want = (rank, base.in_features) if part == "lora_A" else (base.out_features, rank)
        if tuple(tensor.shape) != want:
            wrong.append(f"{key} {tuple(tensor.shape)} (model needs {want})")
    if wrong:
        raise AdapterError(f"{directory} does not fit {type(model).__name__}: wrong shapes: {', '.join(wrong[:5])}")


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base (in place): the model is plain again and saves as a full checkpoint."""
    modules = lora_modules(model)
    if not modules:
        raise AdapterError(f"{type(model).__name__} has no LoRA adapters to merge")
    for name, module in modules.items():
        model.set_submodule(name, module.merged())
    del model.lora_config
    return model


def merge_checkpoint(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                     force: bool = False, dtype: str = "auto", **hub: Any) -> nn.Module:  # fmt: skip
    """`glmkit merge BASE ADAPTER OUT`: load BASE in float, apply ADAPTER, merge, save a plain checkpoint with
    BASE's tokenizer files beside it; returns the merged model."""
    from .auto import AutoModelForCausalLM
    from .checkpoint import check_writable_output, copy_file_atomic
    from .hub import is_tokenizer_file, resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(base, **hub)
    out = Path(out)
    if out.resolve() in (directory.resolve(), Path(adapter).resolve()):
        raise ValueError("merge writes a new directory; OUT must differ from BASE and ADAPTER")
    check_writable_output(out, force)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, adapter=adapter)
    merge(model).save_pretrained(out)
    for file in sorted(directory.iterdir()):
        if file.is_file() and is_tokenizer_file(file.name):
            copy_file_atomic(file, out / file.name)
    return model


# ---- several adapters at once, chosen per batch row (serving) -----------------------------------------


class MultiLoraLinear(nn.Module):
    """A frozen linear with several adapters stacked; each batch row uses the one `rows` names (0: none).
    Ranks are zero-padded to the largest and each scaling is folded into its B, so a row's output is exactly
    its own adapter's. `rows` is set only inside `route(...)`, around one forward."""

    def __init__(self, base_layer: nn.Module, adapters: list[tuple[torch.Tensor, torch.Tensor] | None]):
        super().__init__()
        self.base_layer = base_layer
        rank = max(a.shape[0] for a, _ in filter(None, adapters))
        dtype = adapters[next(i for i, x in enumerate(adapters) if x)][0].dtype
        n, (out_f, in_f) = len(adapters) + 1, (base_layer.out_features, base_layer.in_features)
        A, B = torch.zeros(n, rank, in_f, dtype=dtype), torch.zeros(n, out_f, rank, dtype=dtype)
        for i, pair in enumerate(adapters, 1):
            if pair is not None:
                A[i, : pair[0].shape[0]], B[i, :, : pair[1].shape[1]] = pair
        device = next(base_layer.buffers(), next(base_layer.parameters(), None)).device
        self.register_buffer("A", A.to(device), persistent=False)  # (adapters + 1, r, in)
        self.register_buffer("B", B.to(device), persistent=False)  # (adapters + 1, out, r)
        self.rows: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.rows is None:
            return y
        A, B = self.A[self.rows], self.B[self.rows]  # (rows, r, in), (rows, out, r)
        h = x.to(A.dtype).reshape(len(self.rows), -1, x.shape[-1])  # (rows, T, in)
        delta = torch.bmm(torch.bmm(h, A.transpose(1, 2)), B.transpose(1, 2))  # (rows, T, out)
        return y + delta.reshape(y.shape).to(y.dtype)


def load_adapters(model: nn.Module, adapters: dict[str, str | os.PathLike]) -> dict[str, int]:
    """Load several PEFT adapters into `model` for serving (each checked as load_adapter does); returns name ->
    the row id `route` takes (0 is the base model)."""
    if not adapters:
        return {}
    checked = [read_checked_adapter(model, directory) for directory in adapters.values()]
    targets = sorted({n for config, _ in checked for n in select_targets(model, config.target_modules)})
    for name in targets:
        pairs = []
        for config, state in checked:
            key = f"{PEFT_PREFIX}{name}.lora_"
            if f"{key}A.weight" in state:
                pairs.append((state[f"{key}A.weight"], state[f"{key}B.weight"] * config.rank_and_scaling(name)[1]))
            else:
                pairs.append(None)
        model.set_submodule(name, MultiLoraLinear(model.get_submodule(name), pairs))
    return {name: i for i, name in enumerate(adapters, 1)}


@contextlib.contextmanager
def route(modules: list[MultiLoraLinear], rows: list[int], device: torch.device) -> Iterator[None]:
    """Within the block, batch row i of every forward uses adapter rows[i] (0: the base model)."""
    ids = torch.tensor(rows, device=device) if any(rows) else None
    for m in modules:
        m.rows = ids
    try:
        yield
    finally:
        for m in modules:
            m.rows = None


def multi_lora_modules(model: nn.Module) -> list[MultiLoraLinear]:
    return [m for m in model.modules() if isinstance(m, MultiLoraLinear)]


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


__all__ = ["AdapterError", "LoraConfig", "LoraLinear", "MultiLoraLinear", "apply", "load_adapter", "load_adapters",
           "merge", "merge_checkpoint", "read_adapter", "route", "save_adapter", "select_targets",
           "trainable_parameters"]  # fmt: skip
