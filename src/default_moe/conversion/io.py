"""Streaming safetensors checkpoint reading and writing, with validation and atomic output folders.

Nothing here holds more than one tensor (plus its source pieces) in memory:

- `SafetensorsFile` parses and validates a file's header, then reads single tensors with `os.pread` (no mmap, so
  the resident memory is exactly the tensors we hold, not the pages of the file we touched).
- `CheckpointReader` resolves a folder's `model.safetensors.index.json` (or single/unindexed files) into
  name -> (file, dtype, shape) and checks the index, the shards and their sizes before anything is converted.
- `CheckpointWriter` knows every output tensor's name, dtype and shape up front (`TensorPlan`), so it writes each
  shard's header first and then streams the tensors into it one by one.
- `atomic_output_folder` writes into a temporary folder next to DST and renames it into place at the end;
  `atomic_output_file` does the same for one file. Each first removes the temporaries that killed runs left for the
  same DST (`remove_stale_temporaries`): a live writer holds a lock on its temporary, which dies with its process.
"""

import contextlib
import fcntl
import glob
import json
import logging
import math
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


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


def remove_stale_temporaries(dst: Path) -> list[Path]:
    """Remove what killed runs left next to `dst`: `.DST.tmp-*` (a write in progress) and `.DST.old-*` (a replaced
    DST being deleted), folders or files, unless a live writer holds their lock. Logs one line when it removed any."""
    dst = Path(dst)
    removed = []
    for pattern in (f".{glob.escape(dst.name)}.tmp-*", f".{glob.escape(dst.name)}.old-*"):
        for path in sorted(dst.parent.glob(pattern)):
            try:
                lock = _lock(path)
            except FileNotFoundError:  # removed meanwhile
                continue
            if lock is None:  # a live run is writing it
                continue
            try:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            finally:
                os.close(lock)
            removed.append(path)
    if removed:
        names = ", ".join(path.name for path in removed)
        logger.warning("removed %s in %s, left by an earlier interrupted run", names, dst.parent)
    return removed


def _lock(path: Path, wait: bool = False) -> int | None:
    """An exclusive lock on `path` (folder or file), held until the returned descriptor is closed; None when another
    process holds it (unless `wait`). The kernel drops the lock when its process dies, SIGKILL included: an unlocked
    temporary is stale."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def sigterm_deferred() -> Iterator[None]:
    """Hold back SIGTERM until the block has finished, then deliver it to the previous handler (keeps a pair of
    renames in one piece). Signal handlers run in the main thread only; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if received:
            signal.raise_signal(signal.SIGTERM)


def replace_folder(tmp: Path, dst: Path) -> None:
    """Rename the finished folder `tmp` to `dst`. An existing `dst` is moved aside first and deleted after; SIGTERM
    cannot split the two renames, and the deletion of a large old `dst` runs after them."""
    old = None
    with sigterm_deferred():
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old, dst)
                raise
        else:
            os.rename(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_folder(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder next to DST; on success it replaces DST, on any error (SIGTERM included, under
    the `default-moe` command) it is removed. Temporaries of earlier killed runs into the same DST go first."""
    dst = Path(dst)
    created = []  # parents we create, removed again on failure
    parent = dst.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    tmp = lock = None
    try:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(dst)
            with sigterm_deferred():  # no SIGTERM between creating the folder and knowing its name
                tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
                lock = _lock(tmp, wait=True)  # marks it live for other runs' remove_stale_temporaries
        except OSError as error:
            raise ConversionError(f"cannot write DST {dst}: {error.strerror or error}") from error
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if dst.exists() and any(dst.iterdir()) and not overwrite:  # re-check: someone may have written it meanwhile
            raise ConversionError(f"DST {dst} exists and is not empty (pass --overwrite to replace it)")
        replace_folder(tmp, dst)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    finally:
        if lock is not None:
            os.close(lock)


@contextlib.contextmanager
def atomic_output_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write to; on success it replaces `path` (flushed to disk, one rename,
    mode as for any new file), on any error it is removed. Temporaries of earlier killed runs go first."""
    path = Path(path)
    remove_stale_temporaries(path)
    fd = tmp = None
    try:
        with sigterm_deferred():  # no SIGTERM between creating the file and knowing its name
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
            tmp = Path(name)
            fcntl.flock(fd, fcntl.LOCK_EX)  # marks it live for other runs' remove_stale_temporaries
        yield tmp
        os.fsync(fd)  # the data the caller wrote through its own handle: same file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` through `atomic_output_file`."""
    with atomic_output_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()
