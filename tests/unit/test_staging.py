"""Staging: header parsing, validation before any data is read, and byte-exact host buffers."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hotswap_api.protocol import PartSpec, TensorSpec
from hotswap_engine.buckets import assign_parts, layout_part
from hotswap_engine.hostmem import HostBufferPool
from hotswap_engine.staging import (
    CheckpointChanged,
    CheckpointMismatch,
    CheckpointNotFound,
    ForbiddenPath,
    MalformedCheckpoint,
    ManifestMismatch,
    StagingError,
    read_index,
    stage,
)
from hotswap_testing.checkpoints import mixed_defs, random_filler, save_file, save_sharded

DEFS = mixed_defs(big_elements=5000)


def reference(path: Path) -> dict[str, torch.Tensor]:
    """What the safetensors library itself reads (the independent reference)."""
    out: dict[str, torch.Tensor] = {}
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for f in files:
        out.update(safetensors.torch.load_file(f))
    return out


def specs_of(path: Path) -> list[TensorSpec]:
    return [loc.spec for loc in read_index(path)]


@pytest.fixture
def single(tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    root.mkdir()
    save_file(root / "model.safetensors", DEFS, random_filler(1))
    return root


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    root = tmp_path / "sharded"
    save_sharded(root, DEFS, random_filler(2), shards=3)
    return root


def assert_staged_equal(staged_tensors: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    for name, t in staged_tensors.items():
        want = ref[name]
        assert t.dtype == want.dtype and tuple(t.shape) == tuple(want.shape), name
        assert torch.equal(t.view(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("kind", ["single_file", "directory", "sharded"])
def test_stage_whole_checkpoint_matches_safetensors(kind: str, single: Path, sharded: Path) -> None:
    source = {"single_file": single / "model.safetensors", "directory": single, "sharded": sharded}[kind]
    root = source if source.is_dir() else source.parent
    staged = stage(source, None, [root.parent], specs_of(source), pinned=False)
    assert staged.complete and len(staged.tensors) == len(DEFS)
    assert_staged_equal(dict(staged.iter_views()), reference(root if kind != "single_file" else source))


def test_stage_parts_cover_checkpoint_once(sharded: Path) -> None:
    ref = reference(sharded)
    seen: dict[str, int] = {}
    for index in range(3):
        staged = stage(sharded, PartSpec(index=index, count=3), [sharded], specs_of(sharded), pinned=False)
        assert staged.parts == (index,)
        for name in staged.tensors:
            assert name not in seen
            seen[name] = index
        assert_staged_equal(dict(staged.iter_views()), ref)
        # the host buffer follows the planner's layout (what makes one copy per bucket possible)
        layout = layout_part(staged.items(), index)
        assert {p.name: p.offset for p in layout.placements} == {
            n: t.offset for n, t in staged.tensors.items()
        }
        assert all(t.offset % 256 == 0 for t in staged.tensors.values())
        staged.release()
    assert seen == assign_parts([(loc.spec.name, loc.nbytes) for loc in read_index(sharded)], 3)


def test_stage_uses_parallel_reads_for_large_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pieces smaller than the big tensor force several preadv calls into one destination.
    monkeypatch.setattr("hotswap_engine.staging.READ_PIECE_BYTES", 4096)
    save_file(tmp_path / "m.safetensors", DEFS, random_filler(3))
    staged = stage(tmp_path / "m.safetensors", None, [tmp_path], None, pinned=False, threads=4)
    assert_staged_equal(dict(staged.iter_views()), reference(tmp_path / "m.safetensors"))
    # prefaulting first (the agent's stage_prefault setting) reads the same bytes
    staged = stage(tmp_path / "m.safetensors", None, [tmp_path], None, pinned=False, threads=2, prefault=True)
    assert_staged_equal(dict(staged.iter_views()), reference(tmp_path / "m.safetensors"))


def test_forbidden_paths(tmp_path: Path, single: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    with pytest.raises(ForbiddenPath, match="outside the allowed roots"):
        stage(single, None, [allowed], None)
    # a symlink inside the root pointing outside it
    (allowed / "link").symlink_to(single)
    with pytest.raises(ForbiddenPath):
        stage(allowed / "link", None, [allowed], None)
    # a directory inside whose shard is a symlink to a file outside
    inner = allowed / "inner"
    inner.mkdir()
    (inner / "model.safetensors").symlink_to(single / "model.safetensors")
    with pytest.raises(ForbiddenPath):
        stage(inner, None, [allowed], None)
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        stage(allowed / "missing", None, [allowed], None)
    with pytest.raises(ForbiddenPath, match="outside the allowed roots"):
        stage(tmp_path / "elsewhere" / "missing", None, [allowed], None)  # no hint whether it exists
    # `..` that stays inside is fine
    (allowed / "sub").mkdir()
    save_file(allowed / "ok.safetensors", DEFS[:2], random_filler(4))
    assert (
        len(stage(allowed / "sub" / ".." / "ok.safetensors", None, [allowed], None, pinned=False).tensors)
        == 2
    )


def test_checkpoint_mismatch_lists_every_problem(tmp_path: Path, single: Path) -> None:
    expected = specs_of(single)
    changed = [d for d in DEFS if d[0] not in ("b.bias",)]  # missing b.bias
    changed = [("a.weight", "F32", (64, 33)) if d[0] == "a.weight" else d for d in changed]  # dtype
    changed = [("j.weight", "BF16", (96, 128)) if d[0] == "j.weight" else d for d in changed]  # shape
    changed.append(("z.extra", "F32", (2,)))  # unexpected
    save_file(tmp_path / "bad.safetensors", changed, random_filler(5))
    with pytest.raises(CheckpointMismatch) as e:
        stage(tmp_path / "bad.safetensors", None, [tmp_path], expected)
    msg = str(e.value)
    assert "missing tensors: b.bias" in msg
    assert "unexpected tensors: z.extra" in msg
    assert "a.weight (expected BF16[64, 33], got F32[64, 33])" in msg
    assert "j.weight (expected BF16[128, 96], got BF16[96, 128])" in msg


def write_raw(path: Path, header: Mapping[str, object], data_len: int) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)


def test_malformed_headers_are_rejected(tmp_path: Path) -> None:
    cases = {
        "truncated_data": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "beyond"),
        "overlap": (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            24,
            "overlap",
        ),
        "size_mismatch": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, 8, "needs 16"),
        "reversed": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, 8, "offsets"),
        "bad_dtype": ({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, 1, "unsupported dtype"),
        "bad_entry": ({"a": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, 4, "malformed"),
    }
    for name, (header, data_len, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        write_raw(path, header, data_len)
        with pytest.raises(MalformedCheckpoint, match=message):
            stage(path, None, [tmp_path], None)
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(MalformedCheckpoint, match="truncated"):
        stage(tmp_path / "short.safetensors", None, [tmp_path], None)
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(MalformedCheckpoint, match="exceeds"):
        stage(tmp_path / "huge.safetensors", None, [tmp_path], None)
    (tmp_path / "notjson.safetensors").write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(MalformedCheckpoint, match="not JSON"):
        stage(tmp_path / "notjson.safetensors", None, [tmp_path], None)


def test_index_problems(sharded: Path) -> None:
    index = sharded / "model.safetensors.index.json"
    original = json.loads(index.read_text())
    broken = json.loads(index.read_text())
    broken["weight_map"]["ghost"] = next(iter(broken["weight_map"].values()))
    index.write_text(json.dumps(broken))
    with pytest.raises(MalformedCheckpoint, match="ghost"):
        read_index(sharded)
    broken = json.loads(json.dumps(original))
    broken["weight_map"]["a.weight"] = "../escape.safetensors"
    index.write_text(json.dumps(broken))
    with pytest.raises(MalformedCheckpoint, match="plain file name"):
        read_index(sharded)


def test_truncated_shard_is_rejected_before_reading(sharded: Path) -> None:
    shard = sorted(sharded.glob("*.safetensors"))[0]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 1)
    with pytest.raises(MalformedCheckpoint, match="truncated"):
        stage(sharded, None, [sharded], None)


def test_manifest(sharded: Path) -> None:
    files = sorted(sharded.glob("*.safetensors"))
    digests = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    (sharded / "manifest.json").write_text(json.dumps({"files": digests}))
    staged = stage(sharded, None, [sharded], None, manifest="manifest.json", pinned=False)
    assert staged.complete
    wrong = dict(digests)
    wrong[files[1].name] = "0" * 64
    (sharded / "wrong.json").write_text(json.dumps({"files": wrong}))
    with pytest.raises(ManifestMismatch, match=f"{files[1].name} has a different sha256"):
        stage(sharded, None, [sharded], None, manifest="wrong.json")
    partial = {k: v for k, v in digests.items() if k != files[0].name}
    (sharded / "partial.json").write_text(json.dumps({"files": partial}))
    with pytest.raises(ManifestMismatch, match="not listed"):
        stage(sharded, None, [sharded], None, manifest="partial.json")
    (sharded / "junk.json").write_text("[1, 2]")
    with pytest.raises(ManifestMismatch):
        stage(sharded, None, [sharded], None, manifest="junk.json")
    with pytest.raises(ForbiddenPath):
        stage(sharded, None, [sharded], None, manifest="/etc/hostname")


def test_errors_are_value_errors() -> None:
    for cls in (ForbiddenPath, CheckpointMismatch, ManifestMismatch, MalformedCheckpoint):
        assert issubclass(cls, StagingError) and issubclass(cls, ValueError)


def test_host_buffer_is_shared_memory_on_cpu(single: Path) -> None:
    staged = stage(single, None, [single], None, pinned=False)
    buffer = staged.segments[0]
    assert not buffer.pinned
    # an anonymous shared mapping: a forked child's writes are visible to the parent
    pid = os.fork()
    if pid == 0:
        buffer.tensor[0] = 0x5A
        os._exit(0)
    os.waitpid(pid, 0)
    assert int(buffer.tensor[0]) == 0x5A
    staged.release()


def test_pool_reuses_released_buffers(tmp_path: Path) -> None:
    for i in range(3):
        save_file(tmp_path / f"v{i}.safetensors", DEFS, random_filler(20 + i))
    pool = HostBufferPool(pinned=False, max_idle_bytes=1 << 30)
    first = stage(tmp_path / "v0.safetensors", None, [tmp_path], None, pool=pool)
    ptr = first.segments[0].data_ptr()
    first.release()
    assert pool.idle_bytes >= first_nbytes(tmp_path)
    second = stage(tmp_path / "v1.safetensors", None, [tmp_path], None, pool=pool)
    assert pool.reused == 1 and second.segments[0].data_ptr() == ptr
    assert_staged_equal(dict(second.iter_views()), reference(tmp_path / "v1.safetensors"))
    # a buffer still in use is never handed out twice
    third = stage(tmp_path / "v2.safetensors", None, [tmp_path], None, pool=pool)
    third_ptr = third.segments[0].data_ptr()
    assert third_ptr != ptr and pool.reused == 1
    assert_staged_equal(dict(second.iter_views()), reference(tmp_path / "v1.safetensors"))
    second.release()
    third.release()
    # closing a buffer twice (two versions sharing it) does not free it under the pool
    idle = pool.idle_bytes
    again = pool.acquire(third_size := first_nbytes(tmp_path))
    again.close()
    again.close()
    assert pool.idle_bytes == idle
    assert {pool.acquire(third_size).data_ptr() for _ in range(2)} == {ptr, third_ptr}
    # a much smaller request does not take a large idle buffer; the idle limit frees the oldest
    small = pool.acquire(100)
    assert small.capacity == 100
    small.close()
    tight = HostBufferPool(pinned=False, max_idle_bytes=150)
    for n in (100, 120):
        tight.acquire(n).close()
    assert tight.idle_bytes == 120
    pool.clear()
    assert pool.idle_bytes == 0


def first_nbytes(path: Path) -> int:
    return sum(loc.nbytes for loc in read_index(path / "v0.safetensors"))


@pytest.mark.parametrize("how", ["rewritten_in_place", "replaced"])
def test_a_checkpoint_changed_while_it_is_read_stages_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A writer changes the file after the first piece was read: the buffer would mix two contents,
    so staging fails (CheckpointChanged, which the agent answers 409: retried later) and the buffer
    goes back to the pool; read again once the writer is done, the new content is staged."""
    path = tmp_path / "m.safetensors"
    save_file(path, DEFS, random_filler(1))
    newer = tmp_path / "newer.safetensors"
    save_file(newer, DEFS, random_filler(2))  # same header, other bytes: only a mix would show it
    monkeypatch.setattr("hotswap_engine.staging.READ_PIECE_BYTES", 4096)
    real_preadv = os.preadv
    calls = []

    def preadv_then_write(fd: int, buffers: list[memoryview], offset: int) -> int:
        got = real_preadv(fd, buffers, offset)
        calls.append(offset)
        if len(calls) == 1:  # the writer strikes between two pieces
            st = path.stat()
            if how == "replaced":
                os.replace(newer, path)
            else:
                with path.open("r+b") as f:
                    f.write(newer.read_bytes())
                # A coarse filesystem clock may not tick between this write and the stat before
                # the read; a real writer's later mtime is what the check relies on.
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        return got

    monkeypatch.setattr(os, "preadv", preadv_then_write)
    pool = HostBufferPool(pinned=False, max_idle_bytes=1 << 30)
    with pytest.raises(CheckpointChanged, match="changed while it was being read"):
        stage(path, None, [tmp_path], None, pool=pool, threads=1)
    assert len(calls) > 1 and pool.idle_bytes > 0  # the half-read buffer went back to the pool
    monkeypatch.setattr(os, "preadv", real_preadv)
    staged = stage(path, None, [tmp_path], None, pool=pool, threads=1)
    want = reference(path)
    assert_staged_equal(dict(staged.iter_views()), want)
    staged.release()
