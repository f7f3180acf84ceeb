"""Staging: safetensors checkpoints from a filesystem path into one contiguous host buffer.

Headers are parsed here (8-byte little-endian length, then JSON) rather than through the
safetensors library, because staging needs the raw byte ranges: it validates everything first
(path, names/shapes/dtypes against the served model, optional sha256 manifest, header sanity) and
only then reads the owned tensors' bytes with large `preadv` calls straight into the (pinned) host
buffer, several in parallel, with no intermediate copy.

The buffer layout is `buckets.layout_part`: tensors by name at aligned offsets. The transfer
pipeline relies on that to move each bucket with one copy.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from hotswap_api.protocol import PartSpec, TensorSpec

from hotswap_engine import buckets
from hotswap_engine.hostmem import HostBuffer, HostBufferPool

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # the format's own reference implementation refuses larger headers
READ_PIECE_BYTES = 64 << 20  # one preadv per piece: large enough for full-speed sequential reads

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "C64": torch.complex64,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}


class StagingError(ValueError):
    """A checkpoint that cannot be staged; the message says why."""


class ForbiddenPath(StagingError):
    pass


class InvalidPath(StagingError):
    """A path no file can have (control characters such as an embedded NUL byte)."""


class CheckpointNotFound(StagingError):
    """The path lies inside an allowed root but nothing is there."""


class CheckpointMismatch(StagingError):
    pass


class ManifestMismatch(StagingError):
    pass


class MalformedCheckpoint(StagingError):
    pass


class CheckpointChanged(Exception):
    """A checkpoint file changed (rewritten in place, replaced, resized) between the moment its
    header was read and the end of the read of its bytes: what was read may mix two contents, so
    nothing is staged. Not a `StagingError`: the same request may succeed once the writer is done."""


def file_identity(stat: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when a file is rewritten or replaced: device, inode, size, mtime, ctime. (A
    filesystem with a coarse clock can miss two writes within one tick; a sha256 manifest cannot.)"""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@dataclass(frozen=True)
class _Snapshot:
    """The identity of each checkpoint file as it was before its header was read."""

    files: dict[Path, tuple[int, int, int, int, int]]

    @classmethod
    def take(cls, files: Iterable[Path]) -> _Snapshot:
        return cls({f: file_identity(f.stat()) for f in files})

    def check(self, fds: Mapping[Path, int]) -> None:
        """Raise CheckpointChanged unless every file read (through `fds`) and every path is still
        the file the headers came from."""
        for file, before in self.files.items():
            now = [file_identity(os.fstat(fds[file]))] if file in fds else []
            try:
                now.append(file_identity(file.stat()))
            except OSError as e:
                raise CheckpointChanged(f"{file} was removed while it was being read: {e}") from e
            if any(n != before for n in now):
                raise CheckpointChanged(
                    f"{file} changed while it was being read (a writer is still writing it?); "
                    "nothing was staged"
                )


@dataclass(frozen=True)
class TensorLocation:
    """A tensor in a checkpoint file: bytes `[start, end)` of `file` (absolute file offsets)."""

    spec: TensorSpec
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    size = DTYPE_SIZES.get(dtype)
    if size is None:
        raise MalformedCheckpoint(f"unsupported dtype {dtype!r}")
    return size * math.prod(shape)


# ---- headers -----------------------------------------------------------------------------------


def read_header(path: Path) -> list[TensorLocation]:
    """Parse one .safetensors file's header and check it against the file's size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MalformedCheckpoint(f"{path}: truncated (no header length)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise MalformedCheckpoint(
                    f"{path}: header length {header_len} exceeds the file ({size} bytes)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise MalformedCheckpoint(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedCheckpoint(f"{path}: header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise MalformedCheckpoint(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    data_len = size - data_start
    locations: list[TensorLocation] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not (
                isinstance(dtype, str)
                and isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)
            ):
                raise TypeError
            if not (type(begin) is int and type(end) is int):
                raise TypeError
        except (KeyError, TypeError, ValueError) as e:
            raise MalformedCheckpoint(f"{path}: tensor {name!r} has a malformed header entry") from e
        if not 0 <= begin <= end:
            raise MalformedCheckpoint(f"{path}: tensor {name!r} has offsets [{begin}, {end})")
        if end > data_len:
            raise MalformedCheckpoint(
                f"{path}: tensor {name!r} ends at {end}, beyond the file's {data_len} data bytes (truncated?)"
            )
        if end - begin != tensor_nbytes(dtype, shape):
            raise MalformedCheckpoint(
                f"{path}: tensor {name!r} spans {end - begin} bytes, but {dtype}{shape} needs "
                f"{tensor_nbytes(dtype, shape)}"
            )
        spec = TensorSpec(name=name, dtype=dtype, shape=tuple(shape))
        locations.append(TensorLocation(spec, path, data_start + begin, data_start + end))
    ordered = sorted((loc for loc in locations if loc.nbytes), key=lambda loc: loc.start)
    for a, b in itertools.pairwise(ordered):
        if b.start < a.end:
            raise MalformedCheckpoint(f"{path}: tensors {a.spec.name!r} and {b.spec.name!r} overlap")
    return locations


def checkpoint_files(path: Path) -> list[Path]:
    """The files a checkpoint consists of: the file itself, the index's shards, or every
    *.safetensors in the directory."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise StagingError(f"{path}: no such file or directory")
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_index_map(index)
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(p for p in path.iterdir() if p.name.endswith(".safetensors"))
    if not files:
        raise StagingError(f"{path}: holds no .safetensors files and no {INDEX_FILE}")
    return files


def _read_index_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MalformedCheckpoint(f"{index}: not a safetensors index ({e})") from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise MalformedCheckpoint(f"{index}: weight_map must map tensor names to file names")
    for file in weight_map.values():
        if "/" in file or file in ("", ".", ".."):
            raise MalformedCheckpoint(f"{index}: shard name {file!r} must be a plain file name")
    return weight_map


def read_index(path: str | Path) -> list[TensorLocation]:
    """Every tensor of a checkpoint (one file, a directory of files, or a sharded index), by name."""
    path = Path(path)
    by_name: dict[str, TensorLocation] = {}
    for file in checkpoint_files(path):
        for loc in read_header(file):
            if loc.spec.name in by_name:
                raise MalformedCheckpoint(
                    f"tensor {loc.spec.name!r} appears in {by_name[loc.spec.name].file} and {file}"
                )
            by_name[loc.spec.name] = loc
    index = path / INDEX_FILE
    if path.is_dir() and index.is_file():
        weight_map = _read_index_map(index)
        for name, loc in by_name.items():
            if weight_map.get(name) != loc.file.name:
                raise MalformedCheckpoint(
                    f"{index}: tensor {name!r} is in {loc.file.name}, index says {weight_map.get(name)}"
                )
        missing = sorted(set(weight_map) - set(by_name))
        if missing:
            raise MalformedCheckpoint(f"{index}: lists tensors no shard holds: {_names(missing)}")
    return [by_name[name] for name in sorted(by_name)]


def _names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---- validation --------------------------------------------------------------------------------

# C0 control characters and DEL (`protocol.PATH_PATTERN` refuses them at the API already).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_path(path: Path, allowed_roots: Iterable[str | Path]) -> Path:
    """Resolve symlinks and require the result to lie inside one of the allowed roots."""
    if _CONTROL.search(str(path)):
        raise InvalidPath(f"{str(path)!r}: a path must not contain control characters")
    roots = [Path(r).resolve() for r in allowed_roots]
    try:
        resolved = path.resolve(strict=True)
    except FileNotFoundError as e:
        lexical = Path(os.path.abspath(path))
        if any(lexical == root or lexical.is_relative_to(root) for root in roots):
            raise CheckpointNotFound(f"{path} does not exist") from e
        raise ForbiddenPath(f"{path}: outside the allowed roots {[str(r) for r in roots]}") from e
    except (OSError, RuntimeError) as e:
        raise ForbiddenPath(f"{path}: cannot be resolved ({e})") from e
    except ValueError as e:  # what the OS refuses outright, e.g. an embedded NUL byte
        raise InvalidPath(f"{str(path)!r}: {e}") from e
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise ForbiddenPath(
            f"{path} resolves to {resolved}, outside the allowed roots {[str(r) for r in roots]}"
        )
    return resolved


def check_against(actual: Sequence[TensorSpec], expected: Sequence[TensorSpec]) -> None:
    """Require exactly the expected names, each with the expected dtype and shape."""
    have = {s.name: s for s in actual}
    want = {s.name: s for s in expected}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    mismatched = sorted(
        f"{n} (expected {want[n].dtype}{list(want[n].shape)}, got {have[n].dtype}{list(have[n].shape)})"
        for n in set(want) & set(have)
        if (want[n].dtype, tuple(want[n].shape)) != (have[n].dtype, tuple(have[n].shape))
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    if mismatched:
        problems.append(f"mismatched tensors: {_names(mismatched)}")
    if problems:
        raise CheckpointMismatch("checkpoint does not match the served model: " + "; ".join(problems))


def sha256_file(path: Path, piece: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    buf = bytearray(piece)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


def check_manifest(manifest: Path, files: Sequence[Path]) -> None:
    """Every checkpoint file must be listed in the manifest with its sha256."""
    try:
        listed = json.loads(manifest.read_text())["files"]
        if not isinstance(listed, dict):
            raise TypeError("'files' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ManifestMismatch(
            f"{manifest}: not a manifest of the form {{'files': {{name: sha256}}}} ({e})"
        ) from e
    problems = []
    for file in files:
        want = listed.get(file.name)
        if want is None:
            problems.append(f"{file.name} is not listed")
        elif sha256_file(file) != str(want).lower():
            problems.append(f"{file.name} has a different sha256")
    if problems:
        raise ManifestMismatch(f"{manifest}: " + "; ".join(problems))


# ---- staged data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagedTensor:
    spec: TensorSpec
    segment: int  # which host buffer holds it (a part's index in a complete version)
    offset: int
    nbytes: int


class StagedCheckpoint:
    """A checkpoint's bytes in host memory, per tensor: (spec, buffer, offset, nbytes).

    A version staged for one part holds one buffer laid out by `buckets.layout_part`; a complete
    version assembled by a broadcast holds one buffer per part (its own staged buffer is reused, the
    others are filled by the broadcast), so no part is ever copied twice on the host.
    """

    def __init__(
        self,
        specs: Sequence[TensorSpec],
        assignment: Mapping[str, int],
        part_count: int,
        segments: Mapping[int, HostBuffer],
        alignment: int = buckets.DEFAULT_ALIGNMENT,
    ) -> None:
        self.specs = tuple(sorted(specs, key=lambda s: s.name))  # the whole checkpoint's tensors
        self.assignment = dict(assignment)
        self.part_count = part_count
        self.alignment = alignment
        self.segments = dict(segments)
        self.timings: dict[str, float] = {}  # seconds per staging step, when staged from files
        items = self.items()
        by_name = {s.name: s for s in self.specs}
        self.tensors: dict[str, StagedTensor] = {}
        for part, buffer in self.segments.items():
            layout = buckets.layout_part(items, part, alignment)
            if buffer.nbytes < layout.nbytes:
                raise ValueError(
                    f"buffer of part {part} holds {buffer.nbytes} bytes, its layout needs {layout.nbytes}"
                )
            for p in layout.placements:
                self.tensors[p.name] = StagedTensor(by_name[p.name], part, p.offset, p.nbytes)

    def items(self) -> list[buckets.TensorItem]:
        """Planning's view of the whole checkpoint (every tensor with its owning part)."""
        return [
            buckets.TensorItem(s.name, tensor_nbytes(s.dtype, s.shape), self.assignment[s.name])
            for s in self.specs
        ]

    @property
    def parts(self) -> tuple[int, ...]:
        return tuple(sorted(self.segments))

    @property
    def complete(self) -> bool:
        return len(self.tensors) == len(self.specs)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def raw(self, name: str) -> torch.Tensor:
        """A tensor's bytes as a flat uint8 view of the host buffer (no copy)."""
        t = self.tensors[name]
        return self.segments[t.segment].tensor[t.offset : t.offset + t.nbytes]

    def view(self, name: str) -> torch.Tensor:
        """A tensor as its dtype and shape, viewing the host buffer (no copy)."""
        t = self.tensors[name]
        dtype = TORCH_DTYPES.get(t.spec.dtype)
        if dtype is None:
            raise StagingError(f"tensor {name!r}: dtype {t.spec.dtype} has no torch equivalent")
        return self.raw(name).view(dtype).view(t.spec.shape)

    def iter_views(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in sorted(self.tensors):
            yield name, self.view(name)

    def release(self) -> None:
        for buffer in self.segments.values():
            buffer.close()
        self.segments = {}
        self.tensors = {}


def _read_pieces(
    jobs: Sequence[tuple[Path, int, int, int]],
    target: memoryview,
    threads: int,
    snapshot: _Snapshot | None = None,
) -> None:
    """Read (file, file_offset, dest_offset, nbytes) jobs into `target` with parallel `preadv`; with
    `snapshot`, check afterwards that no file changed since it was taken (`CheckpointChanged`)."""
    pieces: list[tuple[Path, int, int, int]] = []
    for file, file_off, dest, n in jobs:
        for done in range(0, n, READ_PIECE_BYTES):
            step = min(READ_PIECE_BYTES, n - done)
            pieces.append((file, file_off + done, dest + done, step))
    pieces.sort(key=lambda p: (str(p[0]), p[1]))
    fds = {file: os.open(file, os.O_RDONLY) for file in {p[0] for p in pieces}}
    try:

        def read(piece: tuple[Path, int, int, int]) -> None:
            file, file_off, dest, n = piece
            got = 0
            while got < n:
                step = os.preadv(fds[file], [target[dest + got : dest + n]], file_off + got)
                if step <= 0:
                    raise MalformedCheckpoint(f"{file}: truncated while reading (offset {file_off + got})")
                got += step

        if threads <= 1 or len(pieces) <= 1:
            for piece in pieces:
                read(piece)
        else:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stage-read") as pool:
                for _ in pool.map(read, pieces):
                    pass
        if snapshot is not None:
            snapshot.check(fds)
    finally:
        for fd in fds.values():
            os.close(fd)


def default_read_threads() -> int:
    """Parallel `preadv` calls: page-cache reads into fresh memory are bound by page faults and
    copies on each thread, so more threads help up to the cores (the agent's `stage_threads`
    setting overrides it)."""
    return max(1, min(16, os.cpu_count() or 1))


def stage(
    source: str | Path,
    part: PartSpec | None,
    allowed_roots: Iterable[str | Path],
    expected: Sequence[TensorSpec] | None,
    *,
    manifest: str | Path | None = None,
    pinned: bool | None = None,
    alignment: int = buckets.DEFAULT_ALIGNMENT,
    threads: int | None = None,
    prefault: bool = False,
    pool: HostBufferPool | None = None,
) -> StagedCheckpoint:
    """Validate a checkpoint and read the tensors of `part` into one host buffer.

    Order matters: nothing is read beyond headers until the path, the tensor list (against
    `expected`, the served model's base checkpoint; None skips that check), the headers' sanity and
    the optional manifest (a path relative to the checkpoint's directory, or absolute; it must lie
    in an allowed root too) have all passed. With `pool`, the buffer comes from (and its
    `release` returns it to) the pool, whose own `pinned` setting applies. `threads` reads in
    parallel (default: `default_read_threads`); `prefault` maps every page of a fresh unpinned
    buffer on all threads first.
    """
    roots = list(allowed_roots)
    path = check_path(Path(source), roots)
    files = checkpoint_files(path)
    for file in files:
        check_path(file, roots)  # a shard may be a symlink pointing elsewhere
    # Before the headers: a file rewritten from here to the end of the read is caught after it.
    snapshot = _Snapshot.take(files)
    locations = read_index(path)
    specs = [loc.spec for loc in locations]
    if expected is not None:
        check_against(specs, expected)
    if manifest is not None:
        base = path if path.is_dir() else path.parent
        manifest_path = check_path(base / manifest, roots)
        check_manifest(manifest_path, [f.resolve() for f in files])

    count = part.count if part is not None else 1
    index = part.index if part is not None else 0
    sizes = [(loc.spec.name, loc.nbytes) for loc in locations]
    assignment = buckets.assign_parts(sizes, count)
    items = [buckets.TensorItem(name, n, assignment[name]) for name, n in sizes]
    layout = buckets.layout_part(items, index, alignment)
    t0 = time.perf_counter()
    if pool is not None:  # a released buffer of the same size is already pinned and faulted in
        buffer = pool.acquire(layout.nbytes, defer_pin=True)
    else:
        buffer = HostBuffer(layout.nbytes, pinned=pinned, defer_pin=True)
    by_name = {loc.spec.name: loc for loc in locations}
    jobs = [
        (by_name[p.name].file, by_name[p.name].start, p.offset, p.nbytes)
        for p in layout.placements
        if p.nbytes
    ]
    try:
        if (
            prefault and not buffer.is_pinned
        ):  # map every page first, on all threads (see HostBuffer.prefault)
            buffer.prefault(threads or default_read_threads())
        t_read = time.perf_counter()
        _read_pieces(jobs, buffer.view, threads or default_read_threads(), snapshot)
        t1 = time.perf_counter()
        buffer.pin()  # after the reads: they populated the pages from several threads
    except BaseException:
        buffer.close()
        raise
    staged = StagedCheckpoint(specs, assignment, count, {index: buffer}, alignment)
    staged.timings = {"prefault": t_read - t0, "read": t1 - t_read, "pin": time.perf_counter() - t1}
    return staged
