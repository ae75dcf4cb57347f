"""Write one safetensors file with direct I/O, hashing its bytes while they are written;
read a freshly written one's tensors back the same way.

Policy: the export's shards are written here, not by safetensors' ``save_file``. The file
is safetensors' own format, byte for byte. This module only writes it differently. Why
omniquant writes the bytes itself:

- ``save_file`` writes through the page cache. On the project's 2-core VMs, free memory is
  handed back to the host, so every page-cache page of a new file is a page the host must
  fault in again. Writing the FP8 slice's 4.7 GB took 7-14 s of the writer thread, nearly
  all of it kernel time on one of the two cores (0.4-1.4 GB/s, varying run to run). With
  ``O_DIRECT`` the same bytes go to the device from two reused 8 MiB buffers that are
  already resident: 1.3-2.0 GB/s, with almost no CPU (1.6 GB written four times each way
  on this machine's disk; ``benchmarks/bench_slice.py`` measures the whole export).
- ``save_file`` cannot hand its bytes to a hasher, so the export read every shard back to
  hash it: about 2.5 s of CPU for the FP8 slice. Here a second thread hashes each chunk
  while this one writes the same chunk.

**The bytes.** The header is what safetensors' ``prepare`` (``safetensors/src/tensor.rs``)
builds. Tensors are sorted by dtype, in the reverse order of its ``Dtype`` enum, then by
name. Data offsets follow that order. ``__metadata__`` comes first. The JSON is compact
and padded with spaces to a multiple of 8 bytes. ``tests/test_safetensors_file.py``
compares the bytes with ``save_file``'s for every dtype, for empty and scalar tensors, and
for names that need JSON escapes. A tensor whose dtype is not in ``_DTYPES`` makes the
whole file go to ``save_file``, hashed by reading it back. No dtype the export writes
does that.

**Direct I/O** needs the buffer, the length and the file offset aligned to the device's
block size. Every write but the last is one whole chunk from the start of a page-aligned
buffer. The last one is padded to ``BLOCK`` bytes, and ``ftruncate`` then cuts the file
back to its length. Where the file system refuses ``O_DIRECT`` (tmpfs refuses it when the
file is opened; another may refuse a write with ``EINVAL``), the file is written through
the page cache instead, from the same chunks. ``OMNIQUANT_DIRECT_IO=0`` asks for that.

**Reading back** (``DirectTensorReader``): the writer's own audit reads every NVFP4 weight
to check its block scales. A file written with direct I/O is not in the page cache, and a
cold read through it costs the same fresh pages: 0.47 GB/s, all kernel time, against
1.6 GB/s with almost no CPU for ``O_DIRECT`` into a reused buffer (1.6 GB read each way on
this machine's disk). The header is parsed by safetensors first (``open_safetensors``
refuses a damaged file); this reader takes a tensor's offsets from the same JSON.

The sha256 is of the bytes handed to ``write(2)``, in file order, as each call returns,
not of the file read back. ``omniquant verify`` and the engine bundle read the files back
and compare against it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import struct
from collections.abc import Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Self

import torch

#: safetensors' ``Dtype`` enum in its declared order (``safetensors/src/tensor.rs``). The
#: header lists tensors from the last of these to the first.
_ENUM_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
    "F64", "I64", "U64",
)  # fmt: skip
_RANK = {name: i for i, name in enumerate(_ENUM_ORDER)}

#: torch dtype -> safetensors dtype, as ``safetensors.torch`` maps them. The sub-byte
#: ``float4_e2m1fn_x2`` is left out: safetensors rewrites its shape.
_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
    torch.float32: "F32", torch.complex64: "C64", torch.float64: "F64", torch.int64: "I64",
    torch.uint64: "U64",
}  # fmt: skip
if hasattr(torch, "float8_e8m0fnu"):
    _DTYPES[torch.float8_e8m0fnu] = "F8_E8M0"
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}

#: Bytes per write: two such buffers alternate (one hashed and written, one filled).
CHUNK = 8 << 20
#: The alignment asked of direct I/O: 4096 covers 512-byte and 4 KiB devices.
BLOCK = 4096


def direct_io_wanted() -> bool:
    """False when ``OMNIQUANT_DIRECT_IO=0`` asks for writes through the page cache."""
    return os.environ.get("OMNIQUANT_DIRECT_IO", "1").strip() != "0"


def _open(path: Path, flags: int, direct: bool) -> tuple[int, bool]:
    """``(fd, direct)``: ``path`` opened with ``O_DIRECT`` where asked and the file system
    takes it (tmpfs answers ``EINVAL``), else through the page cache."""
    flags |= getattr(os, "O_CLOEXEC", 0)
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o666), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o666), False


def _without_direct(fd: int) -> None:
    """Clear ``O_DIRECT`` on ``fd``: a file system that took it at open may refuse an I/O
    with ``EINVAL``; the rest goes through the page cache (same bytes, same offsets)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


def header_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[tuple[str, torch.Tensor]]]:
    """The file's first bytes (length prefix and padded JSON), and the tensors in file order.

    Raises:
        ValueError: A tensor is named ``__metadata__``, is not dense, or is not contiguous.
        KeyError: A dtype is not in ``_DTYPES`` (the caller falls back to ``save_file``).
    """
    for name, t in tensors.items():
        if name == "__metadata__":
            raise ValueError("a tensor named '__metadata__' would be read as the file's metadata")
        if t.layout != torch.strided:
            raise ValueError(f"tensor {name!r} is sparse; safetensors stores dense tensors only")
        if not t.is_contiguous():
            raise ValueError(f"tensor {name!r} is not contiguous; call .contiguous() first")
    items = sorted(tensors.items(), key=lambda kv: (-_RANK[_DTYPES[kv[1].dtype]], kv[0]))
    entries: dict[str, object] = {}
    if metadata is not None:
        entries["__metadata__"] = dict(metadata)
    offset = 0
    for name, t in items:
        end = offset + t.numel() * t.element_size()
        entries[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, items


class SafetensorsWriter:
    """Writes safetensors files one after another, reusing two page-aligned chunk buffers.

    One thread writes through one writer at a time. Hashing runs on ``hasher``, a
    single-worker executor (created here when None), so chunks are hashed in file order.
    """

    def __init__(self, hasher: Executor | None = None, chunk: int = CHUNK):
        if chunk % BLOCK:
            raise ValueError(f"chunk {chunk} is not a multiple of {BLOCK}")
        self.chunk = chunk
        # Anonymous mappings are page-aligned, as direct I/O needs. They are touched once
        # here, so every later chunk reuses resident pages.
        self._maps = [mmap.mmap(-1, chunk) for _ in range(2)]
        self._addr = [ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in self._maps]
        for addr in self._addr:
            ctypes.memset(addr, 0, chunk)
        self._views = [memoryview(m) for m in self._maps]
        self._own_hasher = hasher is None
        self._hasher = hasher or ThreadPoolExecutor(1, thread_name_prefix="omniquant-sha256")
        #: How each file went out: ``{path name: "direct" | "buffered" | "save_file"}``.
        self.modes: dict[str, str] = {}

    def close(self) -> None:
        if self._own_hasher:
            self._hasher.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(
        self, path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
    ) -> str:
        """Write ``tensors`` to ``path`` as safetensors; returns the file's sha256 hex digest."""
        path = Path(path)
        if any(t.dtype not in _DTYPES for t in tensors.values()):
            return self._with_save_file(path, tensors, metadata)
        head, items = header_bytes(tensors, metadata)
        out = _ChunkedFile(path, self, direct_io_wanted())
        try:
            out.put(torch.frombuffer(bytearray(head), dtype=torch.uint8))
            for _name, t in items:
                if t.numel():
                    out.put(t.detach().cpu().reshape(-1).view(torch.uint8))
            digest = out.finish()
        finally:
            out.close()
        self.modes[path.name] = "direct" if out.direct else "buffered"
        return digest

    def _with_save_file(self, path: Path, tensors, metadata) -> str:
        from safetensors.torch import save_file

        from omniquant.checkpoint.layout import sha256_file

        save_file(dict(tensors), str(path), metadata=None if metadata is None else dict(metadata))
        self.modes[path.name] = "save_file"
        return sha256_file(path)


class _ChunkedFile:
    """One file being written: fill a chunk, hash it on the hasher while writing it here,
    then fill the other chunk (waiting first for that chunk's previous hash)."""

    def __init__(self, path: Path, writer: SafetensorsWriter, direct: bool):
        self.w, self.path = writer, path
        self.digest = hashlib.sha256()
        self.fd, self.direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, direct)
        self.buf, self.fill, self.size = 0, 0, 0
        self.pending: list[Future | None] = [None, None]

    def put(self, data: torch.Tensor) -> None:
        """Append the bytes of the contiguous uint8 CPU tensor ``data``."""
        src, left = data.data_ptr(), data.numel()
        while left:
            n = min(left, self.w.chunk - self.fill)
            # ctypes calls release the GIL: the caller's export goes on during the copy.
            ctypes.memmove(self.w._addr[self.buf] + self.fill, src, n)
            self.fill += n
            src += n
            left -= n
            if self.fill == self.w.chunk:
                self._flush()

    def _flush(self) -> None:
        i, n = self.buf, self.fill
        view = self.w._views[i]
        self.pending[i] = self.w._hasher.submit(self.digest.update, view[:n])
        # Direct I/O writes whole blocks; the zeroed tail past ``n`` is cut off by finish().
        padded = n + (-n % BLOCK) if self.direct else n
        if padded > n:
            ctypes.memset(self.w._addr[i] + n, 0, padded - n)
        self._write_all(view[:padded])
        self.size += n
        self.buf, self.fill = 1 - i, 0
        if self.pending[self.buf] is not None:  # its last hash must be done before refilling
            self.pending[self.buf].result()
            self.pending[self.buf] = None

    def _write_all(self, view: memoryview) -> None:
        while view:
            try:
                n = os.write(self.fd, view)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                _without_direct(self.fd)
                self.direct = False
                continue
            view = view[n:]

    def finish(self) -> str:
        if self.fill:
            self._flush()
        for fut in self.pending:
            if fut is not None:
                fut.result()
        if os.fstat(self.fd).st_size != self.size:
            os.ftruncate(self.fd, self.size)
        return self.digest.hexdigest()

    def close(self) -> None:
        for fut in self.pending:  # a failed write leaves no hash reading a reused buffer
            if fut is not None:
                fut.exception()
        os.close(self.fd)


class DirectTensorReader:
    """Reads one safetensors file's tensors with ``O_DIRECT`` into one reused buffer.

    A returned tensor is a view of that buffer, valid until the next ``read``: callers use
    it and drop it (the audit checks one weight at a time). Where ``O_DIRECT`` is refused,
    the file is read through the page cache into the same buffer. The file's header must
    already have been checked by safetensors (``omniquant.checkpoint.verify``).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.data_start = 8 + n
        self.entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self.fd, self.direct = _open(self.path, os.O_RDONLY, direct_io_wanted())
        self._buf: mmap.mmap | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (a view of the reused buffer: valid until the next read)."""
        info = self.entries[name]
        begin, end = info["data_offsets"]
        start, stop = self.data_start + begin, self.data_start + end
        dtype = _TORCH_DTYPES[info["dtype"]]
        if stop == start:
            return torch.empty(info["shape"], dtype=dtype)
        first = start - start % BLOCK
        length = stop - first + (-(stop - first) % BLOCK)
        if self._buf is None or len(self._buf) < length:
            # a tensor still viewing the old buffer keeps it alive; it is not reused
            self._buf = mmap.mmap(-1, max(length, BLOCK))
        view = memoryview(self._buf)[:length]
        got = 0
        while got < stop - first:
            n = self._pread(view[got:], first + got)
            if n == 0:
                raise OSError(errno.EIO, f"{self.path}: ends before tensor {name!r} does")
            got += n
        data = torch.frombuffer(self._buf, dtype=torch.uint8, count=stop - start, offset=start - first)
        return data.view(dtype).reshape(info["shape"])

    def _pread(self, view: memoryview, offset: int) -> int:
        try:
            return os.preadv(self.fd, [view], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self.direct:
                raise
            _without_direct(self.fd)
            self.direct = False
            return os.preadv(self.fd, [view], offset)
