"""Random-access readers for training-record files: JSONL (plain or gzipped), ArrayRecord, TFDS.

Every source maps a position ``i`` (0-based) to one raw record: the JSON text of a record
(JSONL, ArrayRecord) or an already decoded mapping (TFDS). ``location(i)`` names it for error
messages as ``path:N`` with ``N`` the 1-based line (JSONL) or record number (ArrayRecord, TFDS).

Sources are picklable and cheap to pickle (Grain worker processes are spawned, so the pipeline is
pickled into each of them): open file handles and decompressed gzip text are dropped on pickling
and rebuilt lazily in the process that reads. Each source remembers the size and mtime of its
file(s) at indexing time and refuses to read if they changed since.

Source specs (strings, used by configs and CLIs): ``[domain=]PATH`` where PATH is a file, a glob,
or a TFDS dataset directory (one holding ``dataset_info.json``; ``PATH:split`` picks the split,
default ``train``). A ``domain=`` prefix assigns every record of those files to that domain.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")
# group_size:1 makes every record its own chunk, which random access needs.
ARRAY_RECORD_WRITER_OPTIONS = "group_size:1"


class SourceChangedError(RuntimeError):
    """A data file changed between indexing and reading."""


def _file_signature(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns)


def domain_from_path(path: str) -> str:
    """The file name without its data suffixes: ``/d/biology.jsonl.gz`` -> ``biology``."""
    name = os.path.basename(path.rstrip("/"))
    for suffix in sorted(JSONL_SUFFIXES + ARRAY_RECORD_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    # TFDS version directories (name/1.0.0): use the dataset name.
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json")):
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    return name.split(".")[0]


class JsonlSource:
    """One JSONL file (``.gz`` allowed) with a byte-offset index of its non-blank lines.

    Plain files are read with ``os.pread``; gzipped files are decompressed once per process into
    memory (convert large gzipped sets to ArrayRecord to avoid one copy per worker process).
    Blank lines are not records; their count is ``num_blank_lines``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.compressed = self.path.endswith(".gz")
        self.signature = _file_signature(self.path)
        starts, ends, line_numbers, blanks = [], [], [], 0
        chunks: list[bytes] = []
        pos = 0
        # Set when a gzip stream ends early (an interrupted copy): the complete lines before the
        # damage are indexed, the cut last line is not. ``index.note_source`` counts or raises.
        self.truncation: tuple[int, str] | None = None
        line_no = 0
        with self._open_stream() as f:
            try:
                for line_no, line in enumerate(f, start=1):  # noqa: B007 (read after the loop)
                    if self.compressed:
                        chunks.append(line)
                    if line.strip():
                        starts.append(pos)
                        ends.append(pos + len(line.rstrip(b"\r\n")))
                        line_numbers.append(line_no)
                    else:
                        blanks += 1
                    pos += len(line)
            except (EOFError, zlib.error, gzip.BadGzipFile) as err:
                if not self.compressed:
                    raise
                if chunks and not chunks[-1].endswith(b"\n"):  # the cut line
                    pos -= len(chunks.pop())
                    if line_numbers and line_numbers[-1] == line_no:
                        starts.pop(), ends.pop(), line_numbers.pop()
                    line_no -= 1
                self.truncation = (line_no + 1, str(err).splitlines()[0] if str(err) else
                                   type(err).__name__)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)
        self.line_numbers = np.asarray(line_numbers, dtype=np.int64)
        self.num_blank_lines = blanks
        self._data = b"".join(chunks) if self.compressed else None
        self._fd: int | None = None

    def _open_stream(self):  # noqa: ANN202
        return gzip.open(self.path, "rb") if self.compressed else open(self.path, "rb")

    def _load_bytes(self) -> bytes:
        if self.truncation is None:
            with self._open_stream() as f:
                return f.read()
        parts = []  # a damaged gzip stream: the lines before the damage, read as indexed
        with self._open_stream() as f:
            try:
                for line in f:
                    parts.append(line)
            except (EOFError, zlib.error, gzip.BadGzipFile):
                pass
        return b"".join(parts)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_data"] = None
        state["_fd"] = None
        return state

    def __len__(self) -> int:
        return len(self.starts)

    def _check_unchanged(self) -> None:
        if _file_signature(self.path) != self.signature:
            raise SourceChangedError(f"{self.path} changed after it was indexed; restart the run")

    def __getitem__(self, i: int) -> bytes:
        start, end = int(self.starts[i]), int(self.ends[i])
        if self.compressed:
            if self._data is None:
                self._check_unchanged()
                self._data = self._load_bytes()
            return self._data[start:end]
        if self._fd is None:
            self._check_unchanged()
            self._fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self._fd, end - start, start)

    def location(self, i: int) -> tuple[str, int]:
        return self.path, int(self.line_numbers[i])

    def iter_raw(self) -> Iterator[bytes]:
        """Every record in file order (the same order as the positions)."""
        if self._data is not None:
            for start, end in zip(self.starts.tolist(), self.ends.tolist(), strict=True):
                yield self._data[start:end]
            return
        with self._open_stream() as f:
            for line in f:
                if line.strip():
                    yield line.rstrip(b"\r\n")

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


class ArrayRecordSource:
    """One ArrayRecord file whose records are JSON texts (as written by ``write_array_record``)."""

    def __init__(self, path: str | os.PathLike):
        from array_record.python import array_record_module

        self.path = os.fspath(path)
        self.signature = _file_signature(self.path)
        reader = array_record_module.ArrayRecordReader(self.path, "readahead_buffer_size:0")
        try:
            self._length = reader.num_records()
            options = reader.writer_options_string()
        finally:
            reader.close()
        if "group_size:1," not in options + ",":
            raise ValueError(
                f"{self.path} was written with options '{options}'; random access needs "
                f"'{ARRAY_RECORD_WRITER_OPTIONS}' (rewrite it with reasonembed_jax.data.convert)"
            )
        self.num_blank_lines = 0
        self._reader = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    def __len__(self) -> int:
        return self._length

    def _open(self):  # noqa: ANN202
        if self._reader is None:
            from array_record.python import array_record_module

            if _file_signature(self.path) != self.signature:
                raise SourceChangedError(f"{self.path} changed after it was indexed")
            self._reader = array_record_module.ArrayRecordReader(
                self.path, "readahead_buffer_size:0"
            )
        return self._reader

    def __getitem__(self, i: int) -> bytes:
        return self._open().read([int(i)])[0]

    def location(self, i: int) -> tuple[str, int]:
        return self.path, int(i) + 1

    def iter_raw(self, chunk: int = 1024) -> Iterator[bytes]:
        reader = self._open()
        for start in range(0, self._length, chunk):
            yield from reader.read(list(range(start, min(start + chunk, self._length))))


class TfdsSource:
    """A split of a TFDS dataset built by ``reasonembed_jax.data.tfds_builder`` (array_record).

    Reads through ``tensorflow_datasets`` (no TensorFlow needed for array_record data sources);
    records come back as mappings in the JSONL schema (empty optional fields removed).
    """

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        self.path = os.fspath(directory)
        self.split = split
        self._source = None
        self._length = len(self._open())
        self.num_blank_lines = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def _open(self):  # noqa: ANN202
        if self._source is None:
            import tensorflow_datasets as tfds

            builder = tfds.builder_from_directory(self.path)
            self._source = builder.as_data_source(split=self.split)
        return self._source

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> dict[str, Any]:
        from reasonembed_jax.data.tfds_builder import example_to_record

        return example_to_record(self._open()[int(i)])

    def location(self, i: int) -> tuple[str, int]:
        return f"{self.path}[{self.split}]", int(i) + 1

    def iter_raw(self) -> Iterator[dict[str, Any]]:
        for i in range(self._length):
            yield self[i]


RecordSource = JsonlSource | ArrayRecordSource | TfdsSource


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A parsed source spec: files (already glob-expanded, sorted) and an optional domain."""

    paths: tuple[str, ...]
    domain: str | None = None
    split: str = "train"


def parse_source_spec(spec: str) -> SourceSpec:
    """Parses ``[domain=]PATH`` (PATH may be a glob or ``TFDS_DIR:split``)."""
    domain = None
    head, sep, tail = spec.partition("=")
    if sep and os.sep not in head and head.strip():
        domain, spec = head.strip(), tail
    split = "train"
    base, colon, maybe_split = spec.rpartition(":")
    if colon and os.path.isdir(base) and os.path.exists(os.path.join(base, "dataset_info.json")):
        spec, split = base, maybe_split
    if any(ch in spec for ch in "*?["):
        paths = tuple(sorted(glob.glob(spec)))
        if not paths:
            raise FileNotFoundError(f"source glob '{spec}' matches no file")
    else:
        if not os.path.exists(spec):
            raise FileNotFoundError(f"source '{spec}' does not exist")
        paths = (spec,)
    return SourceSpec(paths=paths, domain=domain, split=split)


def open_source(path: str, split: str = "train") -> RecordSource:
    """Opens one file/directory with the reader its name calls for."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")):
            return TfdsSource(path, split)
        raise ValueError(f"{path} is a directory but not a TFDS dataset version directory")
    if path.endswith(ARRAY_RECORD_SUFFIXES) or ".array_record-" in os.path.basename(path):
        return ArrayRecordSource(path)
    if path.endswith(JSONL_SUFFIXES):
        return JsonlSource(path)
    raise ValueError(
        f"cannot tell the format of {path}: expected one of "
        f"{JSONL_SUFFIXES + ARRAY_RECORD_SUFFIXES} or a TFDS directory"
    )


def decode_raw(raw: bytes | str | Mapping[str, Any]) -> Any:
    """JSON-decodes raw bytes/text; mappings (TFDS) pass through (may raise JSONDecodeError)."""
    if isinstance(raw, Mapping):
        return raw
    return json.loads(raw)


def write_array_record(path: str | os.PathLike, payloads: Sequence[bytes] | Iterator[bytes]) -> int:
    """Writes byte payloads as one ArrayRecord file (``group_size:1``); returns the count."""
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(os.fspath(path), ARRAY_RECORD_WRITER_OPTIONS)
    count = 0
    try:
        for payload in payloads:
            writer.write(payload)
            count += 1
    finally:
        writer.close()
    return count
