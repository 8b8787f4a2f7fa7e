"""Safetensors files without the safetensors package: ``write_safetensors`` / ``read_safetensors``
(format: 8-byte little-endian header length, JSON header, raw little-endian tensor data) and
``atomic_write`` (a temporary file renamed over the target, with the umask's permissions), shared by
the sparse deltas, the mixture-of-experts adapters and the PEFT adapter directories. A leaf module:
it imports nothing from pyhappy."""

from __future__ import annotations

import json
import math
import os
import struct

import torch

# ---- safetensors I/O ------------------------------------------------------------------------------

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8"}
_ST_FROM = {v: k for k, v in _ST_DTYPES.items()}


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` (name -> tensor) as a safetensors file (readable by the safetensors library)."""
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"write_safetensors: {name} has unsupported dtype {t.dtype}")
        b = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)

    atomic_write(path, write)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask sets it: put it straight back
    os.umask(mask)
    return mask


def atomic_write(path, write, *, commit: bool = True):
    """Write a file so that readers see the old file or the whole new one, never a part: ``write(f)``
    fills a temporary file in the same folder (binary), which is flushed, fsync'ed and renamed over
    ``path``. On any exception the temporary file is removed and ``path`` is left as it was.
    commit=False: return the temporary file's path instead of renaming (for several files that
    replace together: rename each with os.replace once all are written)."""
    import tempfile

    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        # mkstemp creates the file 0600; a saved file gets what open() would give it: 0666 less the umask
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if not commit:
            return tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


_ST_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I32": 4, "I64": 8, "U8": 1}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def read_safetensors(path, dtypes=None):
    """(tensors, metadata) of a safetensors file.

    The header is checked whole before any data is read, as the safetensors library does: a JSON
    object of tensors, each with a known ``dtype``, a ``shape`` of non-negative ints and
    ``data_offsets`` [begin, end] that span exactly shape x element size bytes, the tensors
    together covering the data without gaps or overlaps. ``dtypes`` (optional): a function of the
    tensor's name giving the torch dtypes it may have (None: any), so a tensor declared with
    another dtype is refused by name rather than loaded and cast. Every error names the file and
    the tensor.
    """
    who = "read_safetensors"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise OSError(f"{who}: cannot read {path}: {e.strerror or e}") from e
    if len(raw) < 8:
        raise ValueError(f"{who}: {path} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{who}: {path} is truncated (header length {n} beyond the file)")
    try:
        header = json.loads(raw[8:8 + n])
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{who}: {path} has a header that is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{who}: {path} has a header that is a JSON {type(header).__name__}, not an object of "
                         "tensors")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"{who}: {path} has __metadata__ that is not an object of strings")
    data = memoryview(raw)[8 + n:]
    plan, spans = {}, []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise ValueError(f"{who}: {where} has an entry that is a JSON {type(info).__name__}, not an object")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in info:
                raise ValueError(f"{who}: {where} has no {field!r}")
        dt = _ST_FROM.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dt is None:
            raise ValueError(f"{who}: {where} has unsupported dtype {info['dtype']!r}")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ValueError(f"{who}: {where} has shape {shape!r}; a shape is a list of non-negative ints")
        offs = info["data_offsets"]
        if not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) and not isinstance(o, bool)
                                                                   for o in offs):
            raise ValueError(f"{who}: {where} has data_offsets {offs!r}; expected [begin, end] ints")
        a, b = offs
        if not (0 <= a <= b <= len(data)):
            raise ValueError(f"{who}: {where} lies outside the file's data (data_offsets {offs}, {len(data)} data "
                             "bytes)")
        nbytes = math.prod(shape) * _ST_SIZE[info["dtype"]]
        if b - a != nbytes:
            raise ValueError(f"{who}: {where} has shape {shape} of {info['dtype']} ({nbytes} bytes) but data_offsets "
                             f"{offs} span {b - a} bytes")
        if dtypes is not None:
            allowed = dtypes(name)
            if allowed is not None and dt not in allowed:
                names = ", ".join(str(d).replace("torch.", "") for d in allowed)
                raise ValueError(f"{who}: {where} is declared {info['dtype']} ({dt}); expected {names}")
        plan[name] = (dt, shape, a, b)
        spans.append((a, b, name))
    end = 0
    for a, b, name in sorted(spans):
        if a != end:
            raise ValueError(f"{who}: {path}: tensor {name!r} starts at byte {a} of the data but the previous "
                             f"tensor ends at {end} (tensors overlap or leave a gap)")
        end = b
    if end != len(data):
        raise ValueError(f"{who}: {path}: the tensors cover {end} bytes of data, the file holds {len(data)}")
    out = {}
    for name, (dt, shape, a, b) in plan.items():
        t = torch.frombuffer(bytearray(data[a:b]), dtype=torch.uint8) if b > a else torch.empty(0, dtype=torch.uint8)
        out[name] = t.view(dt).reshape(shape) if b > a else torch.empty(shape, dtype=dt)
    return out, meta
