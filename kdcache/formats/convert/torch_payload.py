"""Reading the tensors out of a `torch.save` file without unpickling it.

A torch.save file is a zip: `<name>/data.pkl` (a pickle naming tensors), `<name>/data/<key>` (the
raw storages, little-endian). Unpickling runs whatever the pickle names, so a shared file must not
be unpickled. This module reads the pickle's opcodes with `pickletools.genops` (which only parses)
and evaluates a small, closed set of them: containers, numbers, strings, and exactly the globals
torch writes for plain tensors (`torch._utils._rebuild_tensor_v2/v3`, storage classes, dtypes,
`collections.OrderedDict`). Anything else is refused. Tensors come back as numpy arrays (bfloat16
as its uint16 bit patterns, flagged), bounds-checked against their storage.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.errors import FormatError

# Storage class -> numpy dtype. bfloat16 has no numpy dtype: its bits are read as uint16.
_STORAGES = {
    "HalfStorage": np.float16, "FloatStorage": np.float32, "DoubleStorage": np.float64,
    "BFloat16Storage": np.uint16, "BoolStorage": np.bool_, "ByteStorage": np.uint8,
    "CharStorage": np.int8, "ShortStorage": np.int16, "IntStorage": np.int32,
    "LongStorage": np.int64,
}
_DTYPES = {
    "float16": np.float16, "half": np.float16, "float32": np.float32, "float": np.float32,
    "float64": np.float64, "double": np.float64, "bfloat16": np.uint16, "bool": np.bool_,
    "uint8": np.uint8, "int8": np.int8, "int16": np.int16, "short": np.int16,
    "uint16": np.uint16, "int32": np.int32, "int": np.int32, "uint32": np.uint32,
    "int64": np.int64, "long": np.int64, "uint64": np.uint64,
}


class TorchPayloadError(FormatError):
    """A torch.save payload uses something outside the plain-tensor subset kdcache reads."""


@dataclass
class _Global:
    module: str
    name: str


@dataclass
class _StorageType:
    dtype: Any  # numpy dtype, None for UntypedStorage (the tensor names its dtype)
    bfloat16: bool = False


@dataclass
class _Storage:
    key: str
    dtype: Any
    bfloat16: bool
    numel: int


@dataclass
class Tensor:
    """A tensor read from the payload: `array` (uint16 bit patterns when `bfloat16`)."""

    array: np.ndarray
    bfloat16: bool = False

    def as_float32(self) -> np.ndarray:
        if self.bfloat16:
            return (self.array.astype(np.uint32) << 16).view(np.float32)
        return self.array.astype(np.float32)


class _Mark:
    pass


_MARK = _Mark()


def _resolve_global(module: str, name: str) -> Any:
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3"):
        return _Global(module, name)
    if module == "collections" and name == "OrderedDict":
        return _Global(module, name)
    if module == "torch" and name in _STORAGES:
        return _StorageType(np.dtype(_STORAGES[name]), bfloat16=name == "BFloat16Storage")
    if module == "torch.storage" and name == "UntypedStorage":
        return _StorageType(None)
    if module == "torch" and name in _DTYPES:
        return _StorageType(np.dtype(_DTYPES[name]), bfloat16=name == "bfloat16")
    raise TorchPayloadError(f"refusing pickle global {module}.{name}: only plain tensors are read")


def load(data: bytes, *, where: str) -> Any:
    """The object a torch.save payload holds (dicts, lists, tuples, numbers, strings, Tensors)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except zipfile.BadZipFile as exc:
        raise TorchPayloadError(f"{where}: not a torch.save zip archive ({exc})") from None
    pkl = [n for n in names if n.endswith("/data.pkl")]
    if len(pkl) != 1:
        raise TorchPayloadError(f"{where}: expected one data.pkl, found {len(pkl)}")
    prefix = pkl[0][:-len("data.pkl")]
    byteorder = zf.read(prefix + "byteorder").decode().strip() if \
        prefix + "byteorder" in names else "little"
    if byteorder != "little":
        raise TorchPayloadError(f"{where}: byte order {byteorder!r} is not supported")
    storages: dict[str, bytes] = {}

    def storage_bytes(key: str) -> bytes:
        if key not in storages:
            member = f"{prefix}data/{key}"
            if member not in names:
                raise TorchPayloadError(f"{where}: storage {key!r} missing from the archive")
            storages[key] = zf.read(member)
        return storages[key]

    def rebuild(fn: _Global, args: tuple) -> Any:
        if fn.name == "OrderedDict":
            return {}
        if fn.name == "_rebuild_tensor_v2":
            storage, offset, size, stride = args[:4]
            dtype, bf16 = storage.dtype, storage.bfloat16
        else:
            storage, offset, size, stride = args[:4]
            dtype, bf16 = args[6].dtype, args[6].bfloat16
        if not isinstance(storage, _Storage) or dtype is None:
            raise TorchPayloadError(f"{where}: malformed tensor record")
        raw = storage_bytes(storage.key)
        itemsize = np.dtype(dtype).itemsize
        count = len(raw) // itemsize
        size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        if len(size) != len(stride) or any(s < 0 for s in size + stride) or offset < 0:
            raise TorchPayloadError(f"{where}: invalid tensor shape {size} / stride {stride}")
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
        if last >= count:
            raise TorchPayloadError(f"{where}: tensor reaches element {last} of a storage of "
                                    f"{count}")
        base = np.frombuffer(raw, dtype=dtype, count=count)
        view = np.lib.stride_tricks.as_strided(base[offset:], shape=size,
                                               strides=tuple(s * itemsize for s in stride))
        return Tensor(np.array(view), bfloat16=bf16)

    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1:]
                del stack[i:]
                return items
        raise TorchPayloadError(f"{where}: unbalanced pickle (no MARK)")

    try:
        ops = list(pickletools.genops(zf.read(pkl[0])))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise TorchPayloadError(f"{where}: unreadable pickle: {exc}") from None
    for op, arg, _ in ops:
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            if len(stack) != 1:
                raise TorchPayloadError(f"{where}: pickle ends with {len(stack)} values")
            return stack[0]
        if name == "MARK":
            stack.append(_MARK)
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE",
                      "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT"):
            stack.append(arg)
        elif name in ("NEWTRUE", "NEWFALSE", "NONE"):
            stack.append({"NEWTRUE": True, "NEWFALSE": False, "NONE": None}[name])
        elif name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            if arg not in memo:
                raise TorchPayloadError(f"{where}: pickle refers to an unknown memo entry")
            stack.append(memo[arg])
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = tuple(stack[-n:])
            del stack[-n:]
            stack.append(items)
        elif name == "APPEND":
            value = stack.pop()
            stack[-1].append(value)
        elif name == "APPENDS":
            items = pop_mark()
            stack[-1].extend(items)
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            stack[-1][key] = value
        elif name == "SETITEMS":
            items = pop_mark()
            for key, value in zip(items[::2], items[1::2]):
                stack[-1][key] = value
        elif name == "GLOBAL":
            module, _, attr = arg.partition(" ")
            stack.append(_resolve_global(module, attr))
        elif name == "STACK_GLOBAL":
            attr, module = stack.pop(), stack.pop()
            stack.append(_resolve_global(module, attr))
        elif name == "BINPERSID":
            pid = stack.pop()
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                    and isinstance(pid[1], _StorageType)):
                raise TorchPayloadError(f"{where}: unexpected persistent id")
            stack.append(_Storage(key=str(pid[2]), dtype=pid[1].dtype,
                                  bfloat16=pid[1].bfloat16, numel=int(pid[4])))
        elif name == "REDUCE":
            args, fn = stack.pop(), stack.pop()
            if not isinstance(fn, _Global) or not isinstance(args, tuple):
                raise TorchPayloadError(f"{where}: refusing to call {fn!r}")
            stack.append(rebuild(fn, args))
        else:
            raise TorchPayloadError(f"{where}: pickle opcode {name} is outside the tensor subset")
    raise TorchPayloadError(f"{where}: pickle has no STOP")
