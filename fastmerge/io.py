"""Safetensors checkpoints read lazily and written streaming, knowing nothing of merge methods.

Reading: each shard's header is parsed and validated up front (a truncated or corrupt shard is an
error before any work starts). Tensors are zero-copy views of a private memory map of the shard
(``map``): a reader thread pre-faults the next group while the CPU merges, and ``release`` drops
a group's pages from the process once merged, so resident memory stays the tensors in flight.
``read`` copies with ``os.pread`` instead (for callers that keep tensors).

Writing: the whole output layout (names, dtypes, shapes) is known before any weight is read, so
each shard's header is written first and every tensor's bytes go straight to their offset with
``os.pwrite``; no shard is ever buffered in memory.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from . import dtypes
from .errors import FastmergeError

#: a Hugging Face hub id (``owner/name``)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: what a hub snapshot brings: weights, configs, tokenizer and chat-template files (no pickles)
HUB_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja")


def is_hub_id(name: str) -> bool:
    """A Hugging Face hub id (``owner/name``) rather than a local path."""
    return not Path(name).is_absolute() and bool(HUB_ID.match(name))


def local_model(name: str) -> str:
    """``name`` as a local model directory: itself when it exists or is no hub id, else the hub's
    snapshot (downloaded into the Hugging Face cache: the only network access of a merge or a
    search). Offline, or for an id the hub does not have, one line naming it."""
    if not is_hub_id(name) or Path(name).exists():
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=list(HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - any hub failure is the same one-line error
        first = str(e).splitlines()[0] if str(e) else ""
        raise FastmergeError(f"{name}: not a local directory, and the hub could not provide it "
                             f"({type(e).__name__}: {first})") from None

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100_000_000  # the safetensors library's limit


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor's bytes live."""

    name: str
    file: Path
    code: str  # safetensors dtype code (BF16, F32, ...)
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def dtype(self) -> torch.dtype:
        return dtypes.to_torch(self.code)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_json(path: Path, what: str) -> object:
    """A JSON file's value, or a one-line error naming the file (missing, unreadable, not UTF-8,
    not JSON, nested too deeply)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FastmergeError(f"{path}: {what} not found") from None
    except OSError as e:
        raise FastmergeError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise FastmergeError(f"{path}: {what} is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise FastmergeError(f"{path}: {what} is not valid JSON ({e})") from None
    except RecursionError:
        raise FastmergeError(f"{path}: {what} is nested too deeply") from None


def read_json_object(path: Path, what: str) -> dict:
    """``read_json`` of a file that must hold a JSON object (config.json, an index)."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise FastmergeError(f"{path}: {what} must be a JSON object, got {_json_type(data)}")
    return data


def read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a ``model.safetensors.index.json``."""
    index = read_json_object(path, "index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        what = "missing" if "weight_map" not in index else f"a {_json_type(weight_map)}, not an object"
        raise FastmergeError(f"{path}: weight_map is {what}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise FastmergeError(f"{path}: weight_map[{name!r}] must be a shard file name, got {shard!r}")
    return weight_map


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _header_int(value: object) -> int | None:
    """A non-negative JSON integer (not a bool, not 2.0), as serde reads a usize; else None."""
    return value if type(value) is int and value >= 0 else None


def read_header(path: Path) -> dict[str, TensorMeta]:
    """Parse and validate one safetensors file's header (no tensor bytes are read), as strictly as
    the safetensors library: UTF-8 JSON object; ``__metadata__`` a str -> str map; every entry an
    object with a known ``dtype``, a ``shape`` of non-negative ints and two ``data_offsets`` whose
    span is exactly the shape's bytes; the tensors tile the data section from 0 with no gap or
    overlap and end exactly at the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FastmergeError(f"{path}: truncated safetensors file (no header)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > MAX_HEADER or 8 + hlen > size:
                raise FastmergeError(f"{path}: corrupt or truncated safetensors header (length {hlen}, file {size} bytes)")
            text = f.read(hlen).decode("utf-8")
        header = json.loads(text)
    except FileNotFoundError:
        raise FastmergeError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FastmergeError(f"{path}: unreadable safetensors header ({e})") from None
    except RecursionError:
        raise FastmergeError(f"{path}: unreadable safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise FastmergeError(f"{path}: corrupt safetensors header (a JSON {_json_type(header)}, not an object)")
    meta_map = header.get("__metadata__", {})
    if not isinstance(meta_map, dict) or not all(isinstance(v, str) for v in meta_map.values()):
        raise FastmergeError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    metas: dict[str, TensorMeta] = {}
    spans: list[tuple[int, int, str]] = []
    data_start = 8 + hlen
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name}"
        if not isinstance(info, dict):
            raise FastmergeError(f"{where}: corrupt header entry (a JSON {_json_type(info)}, not an object)")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in info:
                raise FastmergeError(f"{where}: corrupt header entry (no {key})")
        code = info["dtype"]
        if not isinstance(code, str) or code not in dtypes.CODES:
            raise FastmergeError(f"{where} has unsupported dtype {code!r}")
        raw_shape = info["shape"]
        if not isinstance(raw_shape, list) or any(_header_int(s) is None for s in raw_shape):
            raise FastmergeError(f"{where}: corrupt header entry (shape {raw_shape!r} is not a list of "
                                 "non-negative integers)")
        offsets = info["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2 or any(_header_int(x) is None for x in offsets)
                or offsets[1] < offsets[0]):
            raise FastmergeError(f"{where}: corrupt header entry (data_offsets {offsets!r} is not "
                                 "[begin, end] with 0 <= begin <= end)")
        shape = tuple(raw_shape)
        begin, end = offsets
        meta = TensorMeta(name, path, code, shape, data_start + begin, end - begin)
        if meta.nbytes != meta.numel * dtypes.itemsize(code):
            raise FastmergeError(f"{where} has inconsistent offsets for shape {list(shape)}: {meta.nbytes} bytes, "
                                 f"the shape needs {meta.numel * dtypes.itemsize(code)}")
        if data_start + end > size:
            raise FastmergeError(f"{path}: truncated shard: tensor {name} ends at byte {data_start + end}, file has {size}")
        metas[name] = meta
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):  # overlaps first: they name both tensors
        if b1 < e0:
            raise FastmergeError(f"{path}: tensor {n1}: data_offsets [{b1}, {e1}] overlap tensor {n0}'s [{b0}, {e0}]")
    pos, last = 0, None
    for begin, end, name in spans:
        if begin != pos:
            raise FastmergeError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] leave a gap of {begin - pos} "
                                 "bytes (tensors must tile the data section from byte 0)")
        pos, last = end, name
    if data_start + pos != size:
        raise FastmergeError(f"{path}: corrupt safetensors file: {size - data_start - pos} bytes after the last "
                             f"tensor{f' ({last})' if last else ''}")
    return metas


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def atomic_write(file: Path, data: bytes | str) -> Path:
    """tmp + fsync + rename: a crash leaves the old file or the new one, never half of one (run
    state, logs, best recipes, path files: everything fastmerge rewrites in place)."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file


def regular_file(path: Path, what: str = "file") -> Path:
    """``path`` when it is a regular file (links followed); anything else is refused before it is
    opened: reading a named pipe would block forever, a device would never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FastmergeError(f"{path}: {what} not found") from None
    except OSError as e:
        raise FastmergeError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise FastmergeError(f"{path}: {what} is {_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}, "
                             "not a regular file")
    return path


def _shard_in(directory: Path, index: Path, key: str, shard: str) -> Path:
    """The shard file an index entry names: a relative name inside the model directory. The name
    is checked, not where a link leads (the Hugging Face cache is links into ../../blobs)."""
    parts = PurePosixPath(shard).parts if isinstance(shard, str) else ()
    if not isinstance(shard, str) or shard.startswith("/") or ".." in parts or "\0" in shard:
        raise FastmergeError(f"{index}: weight_map[{key!r}] names shard {shard!r}, which is not a file name "
                             "inside the model directory (absolute paths and '..' are refused)")
    return directory / shard


def refuse_pickled_weights(path: Path, allow_bin: bool) -> None:
    """For loaders that hand a directory to transformers (eval, DFS sources): a checkpoint whose
    only weights are pickled ``.bin`` files is refused unless ``allow_bin`` (transformers then
    unpickles them with weights_only), as ``fastmerge merge`` refuses them."""
    if allow_bin or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.glob("*.bin") if p.name != "training_args.bin")
    if pickles:
        raise FastmergeError(f"{path / pickles[0]}: only pickled .bin weights found; pass --allow-bin to "
                             "load them (unpickled with weights_only=True)")


class CheckpointReader:
    """One Hugging Face checkpoint directory: config, tensor index, and on-demand tensor reads."""

    def __init__(self, path: str | os.PathLike, allow_bin: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FastmergeError(f"{self.path}: model directory not found")
        self.config = self._load_config()
        self.tensors: dict[str, TensorMeta] = {}
        self._bin_state: dict[str, torch.Tensor] | None = None
        index = self.path / INDEX_NAME
        single = self.path / SINGLE_NAME
        if index.exists():
            weight_map = read_index(regular_file(index, "index"))
            headers: dict[str, dict[str, TensorMeta]] = {}
            for name, shard in weight_map.items():
                if shard not in headers:
                    headers[shard] = read_header(regular_file(_shard_in(self.path, index, name, shard), "shard"))
                if name not in headers[shard]:
                    raise FastmergeError(f"{self.path / shard}: tensor {name} listed in {INDEX_NAME} is missing")
                self.tensors[name] = headers[shard][name]
        elif single.exists():
            self.tensors = read_header(regular_file(single, "shard"))
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if shards:
                for shard in shards:
                    self.tensors.update(read_header(regular_file(shard, "shard")))
            elif list(self.path.glob("*.bin")):
                if not allow_bin:
                    raise FastmergeError(
                        f"{self.path}: only pickled .bin weights found; pass --allow-bin to load them "
                        "(with torch.load(weights_only=True))"
                    )
                self._load_bin()
            else:
                raise FastmergeError(f"{self.path}: no model.safetensors, shards or index found")
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        # the reader thread and the caller's both open files and maps: one lock, so that a shard
        # is opened and mapped once (a second map would leak, and release could advise the wrong one)
        self._open_lock = threading.Lock()

    def _load_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return {}
        return read_json_object(regular_file(cfg, "config"), "config")

    def _load_bin(self) -> None:
        import torch

        state: dict[str, torch.Tensor] = {}
        for f in sorted(self.path.glob("*.bin")):
            regular_file(f, "weights file")
            try:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
                raise FastmergeError(f"{f}: cannot load with weights_only=True ({e})") from None
        self._bin_state = state
        for name, t in state.items():
            self.tensors[name] = TensorMeta(name, self.path, dtypes.from_torch(t.dtype), tuple(t.shape), 0,
                                            t.numel() * t.element_size())

    def meta(self, name: str) -> TensorMeta:
        """Where tensor ``name`` lives (every lookup goes through here: ``vlm.LMView`` renames)."""
        meta = self.tensors.get(name)
        if meta is None:
            raise FastmergeError(f"{self.path}: tensor {name} not found")
        return meta

    def mappable(self, name: str) -> bool:
        """Whether ``map_bytes`` can view the tensor in place (safetensors, aligned, non-empty)."""
        meta = self.meta(name)
        return self._bin_state is None and meta.offset % dtypes.itemsize(meta.code) == 0 and meta.nbytes > 0

    def map_bytes(self, name: str) -> np.ndarray:
        """The tensor's bytes as a zero-copy uint8 array over a private (copy-on-write) map of the
        shard: writing to it never touches the file. Needs ``mappable(name)``."""
        meta = self.meta(name)
        if not self.mappable(name):
            raise FastmergeError(f"{meta.file}: tensor {name} cannot be mapped in place")
        mm = self._maps.get(meta.file)
        if mm is None:
            with self._open_lock:
                mm = self._maps.get(meta.file)
                if mm is None:
                    with open(meta.file, "rb") as f:
                        mm = self._maps[meta.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return np.frombuffer(mm, dtype=np.uint8, count=meta.nbytes, offset=meta.offset)

    def map(self, name: str) -> torch.Tensor:
        """A zero-copy CPU tensor over the shard's bytes (copy-on-write: writing to it never
        touches the file). Falls back to ``read`` for .bin weights or misaligned offsets."""
        import torch

        if not self.mappable(name):
            return self.read(name)
        meta = self.meta(name)
        return torch.from_numpy(self.map_bytes(name)).view(meta.dtype).reshape(meta.shape)

    def prefault(self, name: str) -> None:
        """Ask the kernel to read the tensor's pages ahead, and map them (one touch per page)."""
        meta = self.meta(name)
        mm = self._maps.get(meta.file)
        if mm is None or meta.nbytes == 0:
            return
        start, length = _page_range(meta.offset, meta.nbytes)
        mm.madvise(mmap.MADV_WILLNEED, start, length)
        np.frombuffer(mm, dtype=np.uint8, count=meta.nbytes, offset=meta.offset)[:: mmap.PAGESIZE].sum()

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (they stay in the page cache)."""
        meta = self.meta(name)
        mm = self._maps.get(meta.file)
        if mm is not None and meta.nbytes:
            start, length = _page_range(meta.offset, meta.nbytes)
            mm.madvise(mmap.MADV_DONTNEED, start, length)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor's bytes from disk into a new CPU tensor of its stored dtype."""
        import torch

        meta = self.meta(name)
        if self._bin_state is not None:
            return self._bin_state[meta.name]
        fd = self._fds.get(meta.file)
        if fd is None:
            with self._open_lock:
                fd = self._fds.get(meta.file)
                if fd is None:
                    fd = self._fds[meta.file] = os.open(meta.file, os.O_RDONLY)
        buf = torch.empty(meta.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < meta.nbytes:
            got = os.preadv(fd, [view[done:]], meta.offset + done)
            if got <= 0:
                raise FastmergeError(f"{meta.file}: truncated shard while reading tensor {name}")
            done += got
        return buf.view(meta.dtype).reshape(meta.shape)

    def close(self) -> None:
        with self._open_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            _close_maps(self._maps)


def _page_range(offset: int, nbytes: int) -> tuple[int, int]:
    """(start, length) of the page-aligned byte range covering a tensor (madvise wants
    page-aligned starts)."""
    start = offset - offset % mmap.PAGESIZE
    return start, offset + nbytes - start


def _close_maps(maps: dict) -> None:
    for mm in maps.values():
        try:
            mm.close()
        except BufferError:  # an array or tensor still views it; it is unmapped when that one dies
            pass
    maps.clear()


@dataclass
class OutTensor:
    name: str
    code: str  # safetensors dtype code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = dtypes.itemsize(self.code)
        for s in self.shape:
            n *= s
        return n


MADV_POPULATE_WRITE = 23  # Linux 5.14+; not in Python 3.11's mmap module


def _fallocate(fd: int, size: int) -> int:
    """fallocate(2) of [0, size): 0, or the errno (fallocate, unlike posix_fallocate, never falls
    back to writing zeros where the filesystem lacks it; that is EOPNOTSUPP here)."""
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "fallocate", None)
    if fn is None:
        return errno.EOPNOTSUPP
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return 0 if fn(fd, 0, 0, size) == 0 else ctypes.get_errno()


def _reserve(fd: int, size: int, path: Path) -> None:
    """Allocate the shard's blocks before the merge starts: a full disk is then a clear error up
    front, not a failed write (or a SIGBUS through the shared map) in the middle. Filesystems
    without fallocate just go on."""
    import errno

    err = _fallocate(fd, size) if size else 0
    if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        raise FastmergeError(f"{path}: cannot reserve {size / 1e9:.2f} GB for the output shard: {os.strerror(err)}")


class ShardedWriter:
    """Writes a known list of tensors into shards: headers first, then bytes at their offsets.

    Two ways in: ``write`` (pwrite a finished tensor) and ``map_out`` (the tensor's bytes in the
    shard, mapped shared, for the fused CPU loop to write into directly: no output buffer to fault
    in, no copy into the page cache afterwards). Blocks are reserved up front (``_reserve``)."""

    def __init__(self, directory: Path, tensors: list[OutTensor], max_shard_bytes: int, metadata: dict | None = None):
        self.directory = directory
        self.location: dict[str, tuple[int, int, int]] = {}  # name -> (fd, absolute offset, bytes)
        groups: list[list[OutTensor]] = [[]]
        size = 0
        for t in tensors:
            if groups[-1] and size + t.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        n = len(groups)
        self.files = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._fds: list[int] = []
        self._sizes: dict[int, int] = {}
        self._maps_lock = threading.Lock()
        self._maps: dict[int, mmap.mmap] = {}
        self._populate = True
        self.total_bytes = 0
        weight_map = {}
        try:  # a full disk (no room to reserve, to write a header or the index): no fd left open
            for fname, group in zip(self.files, groups):
                header: dict = {"__metadata__": metadata or {"format": "pt"}}
                off = 0
                for t in group:
                    header[t.name] = {"dtype": t.code, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
                    off += t.nbytes
                    weight_map[t.name] = fname
                raw = json.dumps(header, separators=(",", ":")).encode()
                raw += b" " * (-len(raw) % 8)
                fd = os.open(directory / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                start = 8 + len(raw)
                _reserve(fd, start + off, directory / fname)
                os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
                os.ftruncate(fd, start + off)
                self._sizes[fd] = start + off
                for t in group:
                    self.location[t.name] = (fd, start + header[t.name]["data_offsets"][0], t.nbytes)
                self.total_bytes += start + off
            if n > 1:
                total = sum(t.nbytes for t in tensors)
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
        except BaseException:
            self.close()
            raise

    def write(self, name: str, tensor: torch.Tensor | np.ndarray) -> None:
        """Write a tensor (or a numpy array of its bytes) at its place in its shard."""
        fd, offset, _ = self.location[name]
        if isinstance(tensor, np.ndarray):
            data = memoryview(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8))
        else:
            import torch

            data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)

    def _map(self, fd: int) -> mmap.mmap:
        """The shard's one shared map. The reader thread (``prefault_out``) and the main thread
        (``map_out``) both ask for it: made under a lock, so there is never a second map (which
        would leak, and whose pages ``release_out`` would not drop)."""
        mm = self._maps.get(fd)
        if mm is None:
            with self._maps_lock:
                mm = self._maps.get(fd)
                if mm is None:
                    mm = self._maps[fd] = mmap.mmap(fd, self._sizes[fd], access=mmap.ACCESS_WRITE)
        return mm

    def map_out(self, name: str) -> np.ndarray:
        """The tensor's bytes in its shard as a writable uint8 array (a shared map of the file)."""
        fd, offset, nbytes = self.location[name]
        return np.frombuffer(self._map(fd), dtype=np.uint8, count=nbytes, offset=offset)

    def prefault_out(self, name: str) -> None:
        """Fault the tensor's pages in for writing ahead of the loop that fills them (from another
        thread), where the kernel supports it."""
        fd, offset, nbytes = self.location[name]
        if not self._populate or nbytes == 0:
            return
        try:
            self._map(fd).madvise(MADV_POPULATE_WRITE, *_page_range(offset, nbytes))
        except OSError:  # EINVAL: a kernel before 5.14; the loop faults the pages in itself
            self._populate = False

    def release_out(self, name: str) -> None:
        """Drop a written tensor's pages from this process (they stay in the page cache, dirty)."""
        fd, offset, nbytes = self.location[name]
        mm = self._maps.get(fd)
        if mm is not None and nbytes:
            mm.madvise(mmap.MADV_DONTNEED, *_page_range(offset, nbytes))

    def close(self) -> None:
        _close_maps(self._maps)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
