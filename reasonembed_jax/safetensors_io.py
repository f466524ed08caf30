"""A minimal safetensors reader/writer on numpy memory maps.

Why not ``safetensors.numpy``: numpy has no bfloat16, and we want zero-copy views of one tensor
at a time (import streams an 8B checkpoint tensor by tensor). The format is an 8-byte
little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}`` and the raw
little-endian data. Nothing here can execute code from the file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """Read-only view of one ``.safetensors`` file; ``get(name)`` returns a memory-mapped array."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise SafetensorsError(f"{self.path}: file too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > MAX_HEADER_BYTES:
                raise SafetensorsError(f"{self.path}: header of {header_len} bytes is implausible")
            try:
                header = json.loads(f.read(header_len))
            except json.JSONDecodeError as err:
                raise SafetensorsError(f"{self.path}: corrupt header ({err})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + header_len
        size = os.path.getsize(self.path)
        for name, entry in header.items():
            if entry["dtype"] not in _DTYPES:
                raise SafetensorsError(f"{self.path}: tensor '{name}' has unsupported dtype "
                                       f"{entry['dtype']}")
            begin, end = entry["data_offsets"]
            n = int(np.prod(entry["shape"], dtype=np.int64)) * _DTYPES[entry["dtype"]].itemsize
            if end - begin != n or self._data_start + end > size:
                raise SafetensorsError(f"{self.path}: tensor '{name}' has inconsistent offsets "
                                       "(truncated or corrupt file)")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (no copy)."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = self._map[self._data_start + begin:self._data_start + end]
        return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def save_file(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``tensors`` (numpy arrays, bfloat16 via ml_dtypes allowed) to ``path`` atomically."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    names = sorted(tensors)
    for name in names:
        arr = tensors[name]
        if arr.dtype not in _NAMES:
            raise SafetensorsError(f"tensor '{name}' has unsupported dtype {arr.dtype}")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).astype(tensors[name].dtype.newbyteorder("<"),
                                                             copy=False).tobytes())
    os.replace(tmp, path)


class CheckpointReader:
    """All tensors of a (possibly sharded) HF safetensors checkpoint folder, by name."""

    INDEX = "model.safetensors.index.json"
    SINGLE = "model.safetensors"
    PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "model.pt",
               "model.pth", "tf_model.h5", "flax_model.msgpack")

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = os.fspath(model_dir)
        index_path = os.path.join(self.model_dir, self.INDEX)
        single = os.path.join(self.model_dir, self.SINGLE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = [self.SINGLE]
            weight_map = {}
        else:
            other = sorted(f for f in os.listdir(self.model_dir) if f.endswith(".safetensors"))
            if other:
                files, weight_map = other, {}
            else:
                pickled = [f for f in os.listdir(self.model_dir)
                           if f in self.PICKLED or f.endswith((".bin", ".pt", ".pth", ".pkl"))]
                if pickled:
                    raise SafetensorsError(
                        f"{self.model_dir} holds only pickled weights ({', '.join(pickled)}); "
                        "they are refused because unpickling can run arbitrary code. Convert "
                        "them to safetensors first (e.g. transformers' save_pretrained with "
                        "safe_serialization=True in a trusted environment)."
                    )
                raise FileNotFoundError(f"no safetensors weights in {self.model_dir}")
        self.files = {name: SafetensorsFile(os.path.join(self.model_dir, name)) for name in files}
        self._where: dict[str, SafetensorsFile] = {}
        for sf in self.files.values():
            for key in sf.keys():
                self._where[key] = sf
        missing = [k for k, f in weight_map.items() if k not in self._where]
        if missing:
            raise SafetensorsError(
                f"the index names {len(missing)} tensors absent from the shards, e.g. {missing[:3]}"
            )

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"tensor '{name}' not found in {self.model_dir}")
        return self._where[name].get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)
