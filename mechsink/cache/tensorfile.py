"""A shard's tensor file (safetensors: one tensor [n_rows, d_site] per site): written straight
from memory, or copied in the kernel from the shard's journal with its crc32 combined from the
batches' (no second pass over the data); headers read without loading the file."""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from mechsink.cache.layout import DTYPES, StoreCorrupt, StoreError, _ST_DTYPES, _crc_hex, _repair_shard


_ST_OF_TORCH = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def _byte_view(t: torch.Tensor) -> memoryview:
    raw = t.detach().cpu().contiguous().view(-1)
    raw = raw.view(torch.int16) if t.dtype == torch.bfloat16 else raw  # numpy has no bfloat16
    return memoryview(raw.numpy().view(np.uint8))


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor | list[torch.Tensor]],
                      metadata: Mapping[str, str]) -> tuple[str, int]:
    """Write a safetensors file straight from the tensors' memory, fsync it; return (crc32, size).

    A site's tensor may be given as a list of row blocks, written one after the other (never
    concatenated in memory). Written here rather than with safetensors.save_file, which stages
    through its own temporary file (whose name a killed process would leave behind) or through
    one more copy in memory.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    blocks: list[list[torch.Tensor]] = []
    pos = 0
    for name, t in tensors.items():
        parts = [t] if torch.is_tensor(t) else list(t)
        if not parts:
            raise StoreError(f"no tensor blocks for {name}")
        dt, width = parts[0].dtype, tuple(parts[0].shape[1:])
        if any(p.dtype != dt or tuple(p.shape[1:]) != width for p in parts):
            raise StoreError(f"row blocks of {name} differ in dtype or width")
        n = sum(int(p.shape[0]) for p in parts)
        nbytes = n * int(np.prod(width, dtype=np.int64)) * parts[0].element_size()
        header[name] = {"dtype": _ST_OF_TORCH[dt], "shape": [n, *width], "data_offsets": [pos, pos + nbytes]}
        blocks.append(parts)
        pos += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header so the data starts 8-aligned
    head = struct.pack("<Q", len(blob)) + blob
    crc = zlib.crc32(head)
    size = len(head)
    with open(path, "wb") as f:
        f.write(head)
        for parts in blocks:
            for p in parts:
                if p.numel() == 0:
                    continue
                view = _byte_view(p)
                f.write(view)
                crc = zlib.crc32(view, crc)
                size += view.nbytes
        f.flush()
        os.fsync(f.fileno())
    return _crc_hex(crc), size


_COPY_BUFFER = 1 << 20
_CRC_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the crc32 polynomial (reflected bit order), as in zlib."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


_X2N = [1 << 30]                    # x^(2^k) modulo the polynomial
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32 of A + B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine)."""
    p, k = 1 << 31, 3
    while len2:
        if len2 & 1:
            p = _multmodp(_X2N[k & 31], p)
        len2 >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


def _write_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy_range(src: int, dst: int, n: int, src_off: int, dst_off: int, buf: list) -> None:
    """Copy n bytes between files: in the kernel (copy_file_range: no user-space copy, a reflink on
    file systems that have them), else through a 1 MiB buffer."""
    while n:
        try:
            got = os.copy_file_range(src, dst, n, src_off, dst_off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                raise
            got = 0
        if got <= 0:       # not supported here (or a special file): copy by hand
            if not buf:
                buf.append(memoryview(bytearray(_COPY_BUFFER)))
            chunk = buf[0][: min(n, _COPY_BUFFER)]
            got = os.preadv(src, [chunk], src_off)
            if got <= 0:
                raise OSError(errno.EIO, "journal is shorter than written")
            _write_all(dst, chunk[:got], dst_off)
        n, src_off, dst_off = n - got, src_off + got, dst_off + got


def _write_from_journal(path: Path, journal, records: list[tuple[int, int, int, int]], sites: tuple[str, ...],
                        dims: Mapping[str, int], n: int, dtype: str, metadata: Mapping[str, str]) -> tuple[str, int]:
    """A safetensors file of ``n`` rows per site whose data are the journal's byte ranges
    ``records`` [(site index, offset, nbytes, crc32)], copied site by site; fsync'd; returns
    (crc32, size). The crc32 of the file is combined from the ranges' (no second pass over the data)."""
    item = DTYPES[dtype].itemsize
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    pos = 0
    for site in sites:
        nbytes = n * dims[site] * item
        header[site] = {"dtype": _ST_DTYPES[dtype], "shape": [n, dims[site]], "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    head = struct.pack("<Q", len(blob)) + blob
    crc, size = zlib.crc32(head), len(head)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    buf: list = []
    try:
        _write_all(fd, head, 0)
        for k in range(len(sites)):
            for site_k, off, nbytes, chunk_crc in records:
                if site_k == k:
                    _copy_range(journal.fileno(), fd, nbytes, off, size, buf)
                    crc = crc32_combine(crc, chunk_crc, nbytes)
                    size += nbytes
        os.fsync(fd)
    finally:
        os.close(fd)
    if size != len(head) + pos:
        raise StoreError(f"{path.name}: {size - len(head)} tensor bytes journalled, {pos} expected")
    return _crc_hex(crc), size


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, header dict) of a safetensors file, read without loading it."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise StoreCorrupt(f"{path} is truncated (no safetensors header); {_repair_shard(path)}")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise StoreCorrupt(f"{path} has a corrupt safetensors header (length {n}); {_repair_shard(path)}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise StoreCorrupt(f"{path} is missing; {_repair_shard(path)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StoreCorrupt(f"{path} has a corrupt safetensors header; {_repair_shard(path)}") from None
    if not isinstance(header, dict):
        raise StoreCorrupt(f"{path} has a corrupt safetensors header; {_repair_shard(path)}")
    header.pop("__metadata__", None)
    return 8 + n, header


def _shard_dims(path: Path, sites: tuple[str, ...], dtype: str) -> dict[str, int]:
    """{site: d} of one shard, checked against the store's sites and dtype."""
    _, header = read_safetensors_header(path)
    if set(header) != set(sites):
        raise StoreCorrupt(f"{path} holds sites {sorted(header)}, the store caches {list(sites)}; {_repair_shard(path)}")
    dims = {}
    for site in sites:
        h = header[site]
        if not isinstance(h, dict) or h.get("dtype") != _ST_DTYPES[dtype] or len(h.get("shape", ())) != 2:
            raise StoreCorrupt(f"{path}:{site} is not {_ST_DTYPES[dtype]}[n, d]; {_repair_shard(path)}")
        dims[site] = h["shape"][1]
    return dims
