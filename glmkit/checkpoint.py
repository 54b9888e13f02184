"""Finding, reading and writing weights in the Hugging Face layout.

safetensors first (single file or sharded with model.safetensors.index.json): the header is parsed up
front and each tensor is read on demand with plain file reads into its final memory (no file mapping
stays resident); `.bin` only through `torch.load(weights_only=True, mmap=True)`, which refuses pickled code,
each tensor copied out of the mapping (the model owns its memory: rewriting the file cannot change it).
Saves are atomic: new files are written under temporary names and renamed over the old ones.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}  # fmt: skip
_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}


class CheckpointError(ValueError):
    """Weights are missing, unexpected, the wrong shape, or the files are unreadable."""


class WeightReader:
    """Name -> tensor access over a checkpoint's weight files, opening each file once."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.files = find_weight_files(self.directory)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, dict] = {}
        self._data_start: dict[Path, int] = {}
        self._staging: torch.Tensor | None = None  # one conversion buffer for every read (no heap churn)
        for path in self.files:
            for name in self._open(path).keys():
                self._where[name] = path

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                if path.suffix == ".safetensors":
                    self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
                else:
                    self._handles[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # corrupt or foreign file: say which
                raise CheckpointError(f"cannot read weights from {path}: {err}") from err
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._open(self._where[name])
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype | None:
        handle = self._open(self._where[name])
        if isinstance(handle, dict):
            return handle[name].dtype
        return _SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype())

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name`, in `dtype` if given (converted in slices, never whole in another dtype).

        safetensors are read with plain file reads straight into the tensor's own memory: no mapped
        file pages stay resident, nothing is copied twice, and the result is ordinary private memory
        (a later overwrite of the file cannot change or fault it)."""
        path = self._where[name]
        handle = self._open(path)
        if isinstance(handle, dict):  # a mapped .bin: the result must not share the mapping's pages
            tensor = handle[name]
            out = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            return out.clone() if out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() else out
        entry = self._header(path).get(name, {})
        if entry.get("dtype") in _SAFETENSORS_DTYPES:
            begin, end = entry["data_offsets"]
            return _read_tensor(path, entry, self._data_start[path], dtype, self._staging_for(end - begin))
        tensor = handle.get_tensor(name)  # ints, bool, fp8: the library's own copy
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    def get_slice(self, name: str, dim: int, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Indices [start, stop) of dimension `dim` of tensor `name`, in `dtype` if given: a tensor-parallel
        rank's shard, read without ever holding the whole tensor. A row slice reads just its bytes; a column
        slice streams the rows through the staging buffer a block at a time."""
        path = self._where[name]
        handle = self._open(path)
        if isinstance(handle, dict):  # a mapped .bin: copy just the slice out of the mapping
            part = handle[name].narrow(dim, start, stop - start)
            return part.to(dtype or part.dtype, copy=True) if part.is_floating_point() else part.clone()
        if self._header(path).get(name, {}).get("dtype") not in _SAFETENSORS_DTYPES:  # integer tensors
            return self.get(name, dtype).narrow(dim, start, stop - start).clone()
        entry = self._header(path)[name]
        shape, source = entry["shape"], _SAFETENSORS_DTYPES[entry["dtype"]]
        inner = math.prod(shape[dim + 1 :]) * source.itemsize  # bytes of one index of `dim`
        first, outer = entry["data_offsets"][0], math.prod(shape[:dim])
        if outer == 1:  # one contiguous run of bytes: read as a tensor of its own
            part = {**entry, "shape": [stop - start, *shape[dim + 1 :]],
                    "data_offsets": [first + start * inner, first + stop * inner]}  # fmt: skip
            out = _read_tensor(path, part, self._data_start[path], dtype, self._staging_for(inner * (stop - start)))
            return out.view(*shape[:dim], stop - start, *shape[dim + 1 :])
        out = torch.empty([*shape[:dim], stop - start, *shape[dim + 1 :]], dtype=dtype or source)
        row = shape[dim] * inner  # bytes of one index of the dimensions before `dim`
        staging = self._staging_for(entry["data_offsets"][1] - first)
        buffer = staging if staging.numel() >= row else torch.empty(row, dtype=torch.uint8)
        dest = out.view(outer, stop - start, inner // source.itemsize)
        _read_columns(path, self._data_start[path] + first, row, dest, source, start, buffer)
        return out

    def _staging_for(self, nbytes: int) -> torch.Tensor:
        """The reader's one dtype-conversion buffer (uint8), grown to min(nbytes, _READ_CHUNK) if smaller:
        reused for every tensor, so no freed staging buffers fragment the heap (raising the peak)."""
        size = min(_READ_CHUNK, nbytes)
        if self._staging is None or self._staging.numel() < size:
            self._staging = None  # free the smaller one first
            self._staging = torch.empty(size, dtype=torch.uint8)
        return self._staging

    def _header(self, path: Path) -> dict:
        if path not in self._headers:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self._headers[path] = json.loads(f.read(size))
            self._data_start[path] = 8 + size
        return self._headers[path]

    def floating_dtype(self) -> torch.dtype | None:
        """dtype of the first floating-point tensor: what `dtype="auto"` falls back to."""
        for name in self._where:
            dtype = self.dtype(name)
            if dtype is not None and dtype.is_floating_point:
                return dtype
        return None


class TensorDictReader:
    """The WeightReader interface over tensors already in memory: a caller's state_dict, or the tensors torch.load
    memory-mapped from a foreign checkpoint (Adept's release), where `copy` gives every read its own memory
    rather than the file's mapping."""

    def __init__(self, tensors: dict[str, torch.Tensor], directory: Any, files: list[Path] | None = None,
                 copy: bool = False):  # fmt: skip
        if not isinstance(tensors, dict):
            raise TypeError(f"state_dict must be a dict of tensors, got {type(tensors).__name__}")
        self.tensors, self.directory, self.files, self.copy = tensors, directory, files or [], copy

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def floating_dtype(self) -> torch.dtype | None:
        return next((t.dtype for t in self.tensors.values() if t.is_floating_point()), None)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = self.tensors[name]
        out = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return out.clone() if self.copy and out is tensor else out


_READ_CHUNK = 4 << 20  # bytes staged at a time when converting dtype while reading


def _read_tensor(path: Path, entry: dict, data_start: int, dtype: torch.dtype | None,
                 staging: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Read one safetensors entry with file reads into fresh memory, converting dtype slice by slice
    through the uint8 buffer `staging`."""
    source = _SAFETENSORS_DTYPES[entry["dtype"]]
    shape = entry["shape"]
    begin, end = entry["data_offsets"]
    out = torch.empty(shape, dtype=dtype or source)
    flat = out.view(-1)
    with open(path, "rb", buffering=0) as f:
        f.seek(data_start + begin)
        if out.dtype == source:  # straight into the result
            _read_into(f, flat.view(torch.uint8), end - begin)
            return out
        per_chunk = max(1, staging.numel() // source.itemsize)
        buffer = staging[: per_chunk * source.itemsize].view(source)
        for start in range(0, flat.numel(), per_chunk):
            n = min(per_chunk, flat.numel() - start)
            _read_into(f, buffer[:n].view(torch.uint8), n * source.itemsize)
            flat[start : start + n] = buffer[:n]
    return out


def _read_columns(path: Path, offset: int, row: int, dest: torch.Tensor, source: torch.dtype, start: int,
                  buffer: torch.Tensor) -> None:  # fmt: skip
    """Fill dest (outer, n, inner) with [:, start:start + n, :] of the (outer, ·, inner) tensor at `offset`,
    reading as many `row`-byte rows at a time as `buffer` holds."""
    per_block = buffer.numel() // row
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        for first in range(0, dest.shape[0], per_block):
            n = min(per_block, dest.shape[0] - first)
            _read_into(f, buffer[: n * row], n * row)
            block = buffer[: n * row].view(source).view(n, -1, dest.shape[2])
            dest[first : first + n] = block[:, start : start + dest.shape[1]]


def _read_into(f: Any, dest: torch.Tensor, nbytes: int) -> None:
    """Fill the uint8 tensor `dest` (nbytes long) from the file's current position."""
    view = memoryview(dest.numpy()).cast("B") if nbytes else memoryview(b"")
    done = 0
    while done < nbytes:
        got = f.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{f.name} ends early: the file is truncated")
        done += got


def find_weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint, preferring safetensors; raise naming what was looked for."""
    for index_name, single_name in ((SAFE_INDEX, SAFE_WEIGHTS), (BIN_INDEX, BIN_WEIGHTS)):
        if (directory / single_name).is_file():
            return [directory / single_name]
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index} is not a valid weight index: {err}") from err
            files = sorted({directory / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
            return files
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}"
    )


def resolve_dtype(
    dtype: str | torch.dtype | None, config_dtype: str | None, reader: WeightReader | None
) -> torch.dtype:
    """None -> float32 (the reference's default); "auto" -> config's torch_dtype, else the weights'."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    if dtype == "auto":
        if config_dtype is not None and config_dtype in DTYPES:
            return DTYPES[config_dtype]
        found = reader.floating_dtype() if reader is not None else None
        return found or torch.float32
    try:
        return DTYPES[dtype.removeprefix("torch.")]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown dtype {dtype!r}; use 'auto', {', '.join(sorted(DTYPES))} or a torch.dtype"
        ) from None


def infer_device() -> torch.device:
    """The best device here: CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device_map: str | int | torch.device | dict | None) -> torch.device:
    """The one device of a whole model: "auto", "cpu", "cuda", "cuda:1", an index, or {"": device} (a plan over
    several devices is glmkit.placement's)."""
    if isinstance(device_map, dict):
        device_map = device_map[""]
    if device_map is None:
        return torch.device("cpu")
    if device_map in ("auto", "balanced", "sequential"):  # several devices are glmkit.placement's
        return infer_device()
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        device = torch.device("cuda", device_map)
    else:
        try:
            device = torch.device(device_map)
        except (RuntimeError, TypeError):
            raise ValueError(f"unknown device_map {device_map!r}") from None
    check_device_available(device)
    return device


def check_device_available(device: torch.device) -> None:
    """A device this machine has, else a ValueError saying so (torch's own error is an assertion deep inside)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available here "
                             f"(torch {torch.__version__}); use --device cpu / device_map='cpu' or 'auto'")  # fmt: skip
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")  # fmt: skip
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {str(device)!r} was asked for, but Apple MPS is not available here")


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '2GiB' / bytes -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", size.upper().replace("IB", "iB"))
    if not match:
        raise ValueError(f"cannot parse size {size!r}; use e.g. '5GB', '500MB' or a byte count")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(unit or "_"))


def _shards(state_dict: dict[str, torch.Tensor], max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
    if shard:
        yield shard


SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _readable_by_group(path: Path) -> None:
    """Give a written file the permissions any other new file gets: safetensors' save_file and mkstemp
    create it 0600, unreadable to the group a checkpoint is often shared with."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _temp_path(final: Path) -> Path:
    """A fresh hidden file beside `final` (same directory, so os.replace onto it is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    return Path(name)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old file or the
    new one, never half of one, and an interrupted write leaves the old file as it was."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        tmp.write_text(text)
        _readable_by_group(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """shutil.copyfile through a temporary file beside `dst` and a rename (see atomic_write_text)."""
    dst = Path(dst)
    tmp = _temp_path(dst)
    try:
        shutil.copyfile(src, tmp)
        _readable_by_group(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def saved_weight_files(directory: Path) -> list[Path]:
    """The files a safetensors save replaces: model.safetensors, model-NNNNN-of-NNNNN.safetensors and
    the index. Nothing else (a user's model_backup.safetensors stays)."""
    if not directory.is_dir():
        return []
    return [f for f in directory.iterdir() if f.name in (SAFE_WEIGHTS, SAFE_INDEX) or SHARD_NAME.fullmatch(f.name)]


@dataclass
class StagedWeights:
    """Weight files written to temporary names beside their final ones, not yet in place."""

    directory: Path
    files: list[tuple[Path, Path]]  # (temporary, final), in the order they are moved into place

    def commit(self) -> None:
        """Move the new files into place, then remove the old save's files that the new one does not
        replace. The single file / index goes last, so until then a loader still finds the old layout."""
        final = {f for _, f in self.files}
        stale = [f for f in saved_weight_files(self.directory) if f not in final]
        for tmp, path in self.files:
            os.replace(tmp, path)
        for path in sorted(stale, key=lambda f: f.name != SAFE_INDEX):  # the index before its shards
            path.unlink(missing_ok=True)

    def discard(self) -> None:
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)


def stage_state_dict(
    state_dict: dict[str, torch.Tensor], directory: str | os.PathLike, max_shard_size: int | str = "5GB"
) -> StagedWeights:
    """Write model.safetensors, or numbered shards plus model.safetensors.index.json past the limit, under
    temporary names; `commit()` puts them in place. On any error nothing in `directory` has changed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state_dict.items()}
    shards = list(_shards(tensors, parse_size(max_shard_size)))
    names = [SAFE_WEIGHTS] if len(shards) <= 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                      for i in range(1, len(shards) + 1)]  # fmt: skip
    staged = StagedWeights(directory, [])
    try:
        for name, shard in zip(names, shards or [{}]):
            staged.files.append((_temp_path(directory / name), directory / name))
            save_file(shard, str(staged.files[-1][0]), metadata={"format": "pt"})
            _readable_by_group(staged.files[-1][0])
        if len(shards) > 1:
            weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            staged.files.append((_temp_path(directory / SAFE_INDEX), directory / SAFE_INDEX))
            staged.files[-1][0].write_text(json.dumps(index, indent=2) + "\n")
            _readable_by_group(staged.files[-1][0])
    except BaseException:
        staged.discard()
        raise
    return staged


def save_state_dict(
    state_dict: dict[str, torch.Tensor], directory: str | os.PathLike, max_shard_size: int | str = "5GB"
) -> None:
    """Write model.safetensors, or numbered shards plus model.safetensors.index.json past the limit,
    atomically: the old save's weight files are replaced only once every new file is written."""
    stage_state_dict(state_dict, directory, max_shard_size).commit()


# tokenizer files a checkpoint writer may leave (exact names: a user's own files never match)
TOKENIZER_FILE_NAMES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "sentencepiece.bpe.model", "spiece.model",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.tiktoken",
)  # fmt: skip


def check_writable_output(directory: str | os.PathLike, force: bool, flag: str = "--force") -> None:
    """Refuse to write a checkpoint into an existing non-empty directory unless `force`: whatever is there
    may be someone's only copy."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"output {directory} exists and is not a directory")
    held = sorted(f.name for f in directory.iterdir()) if directory.is_dir() else []
    if held and not force:
        shown = ", ".join(held[:5]) + (", …" if len(held) > 5 else "")
        raise FileExistsError(
            f"output directory {directory} is not empty ({shown}); pass {flag} to write into it (its checkpoint "
            "files are replaced, other files kept) or choose another directory"
        )


def remove_stale_checkpoint_files(directory: str | os.PathLike, written: set[str]) -> list[str]:
    """After a checkpoint is written into a directory that held one: remove the old weight and tokenizer
    files the new one did not rewrite, so two tokenizers never sit side by side. Other files stay."""
    directory = Path(directory)
    stale = [f for f in saved_weight_files(directory) if f.name not in written]
    stale += [directory / n for n in TOKENIZER_FILE_NAMES if n not in written and (directory / n).is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return sorted(p.name for p in stale)
