"""Streaming safetensors checkpoint reading and writing, with validation and atomic output folders.

Nothing here holds more than one tensor (plus its source pieces) in memory:

- `SafetensorsFile` parses and validates a file's header, then reads single tensors with `os.pread` (no mmap, so
  the resident memory is exactly the tensors we hold, not the pages of the file we touched).
- `CheckpointReader` resolves a folder's `model.safetensors.index.json` (or single/unindexed files) into
  name -> (file, dtype, shape) and checks the index, the shards and their sizes before anything is converted.
- `CheckpointWriter` knows every output tensor's name, dtype and shape up front (`TensorPlan`), so it writes each
  shard's header first and then streams the tensors into it one by one.
- `atomic_output_folder` writes into a temporary folder next to DST and renames it into place at the end.
"""

import contextlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message is one line meant for the user."""


# safetensors dtype names <-> torch dtypes
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    file: "SafetensorsFile"
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    def read(self) -> torch.Tensor:
        return self.file.read(self.name)


class SafetensorsFile:
    """One .safetensors file: header parsed and validated on open, tensors read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    self._corrupt("shorter than a safetensors header")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(size - 8, _MAX_HEADER_BYTES):
                    self._corrupt(f"header length {header_len} exceeds the file size {size}")
                header = json.loads(handle.read(header_len))
        except OSError as error:
            raise ConversionError(f"cannot read {self.path}: {error.strerror or error}") from error
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            self._corrupt(f"header is not valid JSON ({error})")
        if not isinstance(header, dict):
            self._corrupt("header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        self.infos: dict[str, TensorInfo] = {}
        spans = []
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                self._corrupt(f"header entry for {name!r} is malformed: {entry!r}")
            if any(d < 0 for d in shape) or end - begin != nbytes(dtype, shape) or begin < 0:
                self._corrupt(f"tensor {name!r} has offsets {begin}..{end} that do not fit dtype and shape {shape}")
            spans.append((begin, end))
            self.infos[name] = TensorInfo(self, name, dtype, shape, data_start + begin, data_start + end)
        data_len = max((end for _, end in spans), default=0)
        if data_start + data_len > size:
            self._corrupt(f"is truncated: its header needs {data_start + data_len} bytes but the file has {size}")
        position = 0
        for begin, end in sorted(spans):
            if begin != position:
                self._corrupt(f"tensor data overlaps or leaves a gap at byte {position}")
            position = end

    def _corrupt(self, why: str):
        raise ConversionError(f"{self.path.name} is not a valid safetensors file (truncated or corrupt?): {why}")

    def read(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        buffer = bytearray(info.end - info.start)
        view = memoryview(buffer)
        with open(self.path, "rb") as handle:
            handle.seek(info.start)
            done = 0
            while done < len(buffer):
                got = handle.readinto(view[done:])
                if not got:
                    self._corrupt(f"tensor {name!r} ends early (did the file change while reading?)")
                done += got
        if not buffer:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)


class CheckpointReader:
    """All tensors of a checkpoint folder, validated: index entries, shard presence, headers and sizes."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index_path = self.folder / INDEX_NAME
        files: dict[str, SafetensorsFile] = {}
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ConversionError(f"{index_path} is not a valid safetensors index: {error}") from error
            for file_name in sorted(set(weight_map.values())):
                if not (self.folder / file_name).is_file():
                    raise ConversionError(f"{INDEX_NAME} names shard {file_name}, which is missing from {self.folder}")
                files[file_name] = SafetensorsFile(self.folder / file_name)
            self.infos: dict[str, TensorInfo] = {}
            for name, file_name in weight_map.items():
                info = files[file_name].infos.get(name)
                if info is None:
                    raise ConversionError(f"{INDEX_NAME} says {name} is in {file_name}, but that shard lacks it")
                self.infos[name] = info
        else:
            paths = sorted(self.folder.glob("*.safetensors"))
            if not paths:
                found = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(
                    p.name for p in self.folder.glob("*.pt*")
                )
                hint = f" (found {found[0]}: convert it to safetensors first)" if found else ""
                raise ConversionError(f"no safetensors weights in {self.folder}{hint}")
            _check_shard_series(paths)
            self.infos = {}
            for path in paths:
                shard = SafetensorsFile(path)
                for name, info in shard.infos.items():
                    if name in self.infos:
                        raise ConversionError(
                            f"tensor {name} appears in both {self.infos[name].file.path.name} and {path.name}"
                        )
                    self.infos[name] = info
        self.files = files

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise ConversionError(f"{self.folder} lacks tensor {name}") from None

    def names(self) -> list[str]:
        return list(self.infos)

    def read(self, name: str) -> torch.Tensor:
        return self[name].read()


def _check_shard_series(paths: list[Path]) -> None:
    """Without an index, `model-0000i-of-0000N.safetensors` files must form a complete series."""
    series: dict[tuple[str, str], set[int]] = {}
    for path in paths:
        match = re.fullmatch(r"(.*)-(\d+)-of-(\d+)\.safetensors", path.name)
        if match:
            series.setdefault((match.group(1), match.group(3)), set()).add(int(match.group(2)))
    for (prefix, total), present in series.items():
        missing = sorted(set(range(1, int(total) + 1)) - present)
        if missing:
            name = f"{prefix}-{missing[0]:0{len(total)}d}-of-{total}.safetensors"
            raise ConversionError(f"shard {name} is missing (and there is no {INDEX_NAME})")


@dataclass
class TensorPlan:
    """One output tensor: its name, dtype and shape are known before `make()` reads anything."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '64KiB' or an int number of bytes."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", str(size).upper())
        if not match:
            raise ConversionError(f"cannot parse size {size!r}: expected e.g. 5GB, 500MB or a number of bytes")
        number, unit, suffix = match.groups()
        base = 1024 if suffix == "IB" else 1000
        value = int(float(number) * base ** "_KMGT".index(unit or "_"))
    if value <= 0:
        raise ConversionError(f"shard size must be positive, got {size!r}")
    return value


def plan_shards(plans: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Greedy in-order packing; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for plan in plans:
        if shards[-1] and size + plan.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header_bytes(shard: list[TensorPlan]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for plan in shard:
        header[plan.name] = {
            "dtype": DTYPE_NAMES[plan.dtype],
            "shape": list(plan.shape),
            "data_offsets": [offset, offset + plan.nbytes],
        }
        offset += plan.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(encoded)) + encoded


def write_checkpoint(
    folder: Path, plans: list[TensorPlan], max_shard_bytes: int, progress: Iterator | None = None
) -> list[str]:
    """Write `plans` as (sharded) safetensors plus an index when there is more than one shard.

    Each tensor is produced by its `make()`, checked against the plan, written, and dropped before the next one.
    `progress` is an optional callable(n) advanced once per tensor. Returns the written file names.
    """
    names = [plan.name for plan in plans]
    if len(set(names)) != len(names):
        raise ConversionError("internal error: duplicate output tensor names")
    shards = plan_shards(plans, max_shard_bytes)
    file_names = shard_file_names(len(shards))
    weight_map = {}
    for file_name, shard in zip(file_names, shards, strict=True):
        with open(folder / file_name, "wb") as handle:
            handle.write(_header_bytes(shard))
            for plan in shard:
                tensor = plan.make()
                if tensor.dtype != plan.dtype or tuple(tensor.shape) != plan.shape:
                    raise ConversionError(
                        f"internal error: {plan.name} came out {tensor.dtype} {tuple(tensor.shape)}, "
                        f"planned {plan.dtype} {plan.shape}"
                    )
                if plan.nbytes:
                    handle.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
                weight_map[plan.name] = file_name
                del tensor
                if progress is not None:
                    progress(1)
    if len(shards) > 1:
        index = {
            "metadata": {
                "total_size": sum(plan.nbytes for plan in plans),
                "total_parameters": sum(math.prod(plan.shape) for plan in plans),
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return file_names


def patch_tensor(folder: Path, name: str, tensor: torch.Tensor) -> None:
    """Overwrite the bytes of an existing tensor in place (same dtype and shape), e.g. calibrated EMA buffers."""
    index_path = folder / INDEX_NAME
    file_name = json.loads(index_path.read_text())["weight_map"][name] if index_path.is_file() else SINGLE_NAME
    info = SafetensorsFile(folder / file_name).infos[name]
    if info.dtype != tensor.dtype or info.shape != tuple(tensor.shape):
        raise ConversionError(
            f"internal error: cannot patch {name} {info.dtype} {info.shape} with {tensor.dtype} {tuple(tensor.shape)}"
        )
    with open(folder / file_name, "r+b") as handle:
        handle.seek(info.start)
        handle.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))


def _is_inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_destination(src: Path | None, dst: Path, overwrite: bool) -> None:
    """Fail early (before any work) on a DST we must not or cannot write."""
    dst_resolved = dst.resolve()
    if src is not None:
        src_resolved = src.resolve()
        if _is_inside(dst_resolved, src_resolved) or _is_inside(src_resolved, dst_resolved):
            raise ConversionError(f"DST {dst} must not be SRC, inside SRC, or contain SRC")
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir():
            raise ConversionError(f"DST {dst} exists and is not a folder")
        if any(dst.iterdir()) and not overwrite:
            raise ConversionError(f"DST {dst} exists and is not empty (pass --overwrite to replace it)")
    parent = dst_resolved.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConversionError(f"cannot write DST {dst}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot write DST {dst}: {existing} is not writable")


@contextlib.contextmanager
def atomic_output_folder(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder next to DST; on success it replaces DST, on any error it is removed."""
    dst = Path(dst)
    created = []  # parents we create, removed again on failure
    parent = dst.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    except OSError as error:
        _remove_empty(created)
        raise ConversionError(f"cannot write DST {dst}: {error.strerror or error}") from error
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if dst.exists():
            if any(dst.iterdir()) and not overwrite:  # re-check: someone may have written it meanwhile
                raise ConversionError(f"DST {dst} exists and is not empty (pass --overwrite to replace it)")
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()
