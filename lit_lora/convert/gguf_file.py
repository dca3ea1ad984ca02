"""A GGUF file opened safely: its layout checked before the gguf package reads it, its metadata read by type.

A GGUF file is a header (the magic b"GGUF", the version, how many tensors and metadata entries follow), the
metadata (key, type, value: numbers, text, arrays of them), the tensor table (each tensor's name, dimensions,
type and the offset of its data from the start of the data section), then the data section, which starts at the
next multiple of `general.alignment` (32 unless the file says otherwise).

The gguf package's GGUFReader trusts what the file says. It reads an array one value at a time, and reads nothing
past the end of the file, so an array said to hold 2**62 values is a loop of 2**62 turns; it points each tensor at
whatever offset the table gives, the bytes of another tensor, of the header, or of nothing. So `check_layout`
walks the header, the metadata and the tensor table first, without reading a value it does not need, checking every
count against the bytes that are there and against bounds far above any model's, and every tensor's data against
the data section: inside it, aligned, apart from the others, as long as its shape and type make it. Then GGUFFile
reads the file, and `get` checks the type of each value it is asked for.
"""

import contextlib
import importlib
import math
import mmap
import struct
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

INSTALL_HINT = 'pip install -e ".[gguf]"'

# Bounds far above what a model's file holds, checked before anything loops over a count the file gives.
MAX_METADATA_ENTRIES = 65_536  # files hold tens of entries
MAX_TENSORS = 65_536  # a llama model holds 9 per block and 4 others
# The values of all metadata arrays together: the gguf package reads them one at a time, in Python. Llama 3's
# tokenizer (128,256 tokens, their types and its merges) is well under a million of them.
MAX_ARRAY_VALUES = 4_194_304
MAX_DIMENSIONS = 4  # ggml's tensors have at most 4


def import_gguf():
    """The `gguf` package (llama.cpp's), or an ImportError saying which extra installs it."""
    try:
        import gguf
    except ImportError:
        raise ImportError(f"Reading and writing GGUF files needs the gguf package: {INSTALL_HINT}") from None
    return gguf


def import_for_gguf(module: str, purpose: str) -> Any:
    """`module`, or an ImportError naming the missing package and the extra that installs it (for `purpose`)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = (error.name or module).split(".")[0]
        package = {"google": "protobuf"}.get(missing, missing)  # protobuf's modules are google.protobuf.*
        raise ImportError(f"{purpose} needs the {package} package, which is not installed: {INSTALL_HINT}") from None


def unreadable(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path} cannot be read as a GGUF file: {problem}. It may be incomplete or damaged: download "
                      "or export it again.")


class Cursor:
    """Reads a file's bytes in order, each read refused past the end of the file (naming what it was reading)."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.position = path, data, 0

    def take(self, count: int, what: str) -> bytes:
        if self.position + count > len(self.data):
            raise unreadable(self.path, f"it ends inside {what}")
        self.position += count
        return self.data[self.position - count:self.position]

    def number(self, code: str, what: str) -> int:
        """One little-endian number of struct's `code`: I is 4 bytes, Q 8."""
        return struct.unpack("<" + code, self.take(struct.calcsize(code), what))[0]

    def text(self, what: str) -> str:
        return self.take(self.number("Q", what), what).decode("utf-8", errors="replace")


def check_layout(path: Path) -> None:
    """The header's counts, every metadata entry's extent and every tensor's place in the data section, checked
    without the gguf package (see the module docstring); an error naming the field or tensor otherwise."""
    with open(path, "rb") as handle, (mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                                      if path.stat().st_size else contextlib.nullcontext(b"")) as data:
        cursor = Cursor(path, data)  # memory-mapped: read from disk as it is looked at
        if cursor.take(4, "its first four bytes") != b"GGUF":
            raise unreadable(path, "it does not start with b'GGUF', as every GGUF file does")
        version = cursor.number("I", "GGUF.version")
        if version & 0xFFFF == 0:
            raise unreadable(path, "it is a big-endian GGUF file; lit-lora reads little-endian ones")
        if version not in (2, 3):
            raise unreadable(path, f"GGUF.version is {version}; the gguf package reads versions 2 and 3")
        tensor_count, entry_count = cursor.number("Q", "GGUF.tensor_count"), cursor.number("Q", "GGUF.kv_count")
        for field, count, bound in (("GGUF.tensor_count", tensor_count, MAX_TENSORS),
                                    ("GGUF.kv_count", entry_count, MAX_METADATA_ENTRIES)):
            if count > bound:
                raise unreadable(path, f"{field} is {count:,}, more than the {bound:,} lit-lora accepts")
        alignment = skip_metadata(cursor, entry_count)
        extents = read_tensor_table(cursor, tensor_count)
        data_size = len(data) - (cursor.position + -cursor.position % alignment)  # the data section starts aligned
    check_extents(path, extents, data_size, alignment)


# GGUF's value types (gguf.GGUFValueType) of a fixed size -> their bytes; 8 is text, 9 an array
VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY, UINT32 = 8, 9, 4


def skip_metadata(cursor: Cursor, entry_count: int) -> int:
    """Walk past the metadata entries, checking each one's extent and the arrays' values in all against
    MAX_ARRAY_VALUES, reading no text but the keys; returns general.alignment (32 where the file has none)."""
    array_values, alignment = 0, 32
    for _ in range(entry_count):
        key = cursor.text("a metadata key")
        what = f"the metadata {key}"
        kind = cursor.number("I", what)
        if kind == ARRAY:
            item_kind, count = cursor.number("I", what), cursor.number("Q", what)
            array_values += count
            if array_values > MAX_ARRAY_VALUES:
                raise unreadable(cursor.path, f"{what} is an array of {count:,} values, more than the "
                                              f"{MAX_ARRAY_VALUES:,} lit-lora accepts in all the metadata's arrays")
            if item_kind == STRING:
                for _ in range(count):
                    cursor.take(cursor.number("Q", what), what)
            elif item_kind in VALUE_SIZES:
                cursor.take(count * VALUE_SIZES[item_kind], what)
            else:  # llama.cpp reads no arrays of arrays either
                raise unreadable(cursor.path, f"{what} is an array of values of type {item_kind}, not of numbers or "
                                              "text")
        elif kind == STRING:
            cursor.take(cursor.number("Q", what), what)
        elif kind in VALUE_SIZES:
            value = cursor.take(VALUE_SIZES[kind], what)
            if key == "general.alignment":
                alignment = struct.unpack("<I", value)[0] if kind == UINT32 else 0
                if alignment == 0 or alignment & (alignment - 1):
                    raise unreadable(cursor.path, "general.alignment is not a power of two held as a UINT32")
        else:
            raise unreadable(cursor.path, f"{what} is of type {kind}, which GGUF does not have")
    return alignment


def read_tensor_table(cursor: Cursor, tensor_count: int) -> list[tuple[int, int, str]]:
    """Each tensor's (offset in the data section, size in bytes, name), its size from its dimensions and type."""
    gguf = import_gguf()
    known_types, extents, names = {kind.value for kind in gguf.GGMLQuantizationType}, [], set()
    for _ in range(tensor_count):
        name = cursor.text("a tensor's name")
        what = f"the table entry of tensor {name}"
        if name in names:
            raise unreadable(cursor.path, f"tensor {name} is in the tensor table twice")
        names.add(name)
        dimension_count = cursor.number("I", what)
        if dimension_count > MAX_DIMENSIONS:
            raise unreadable(cursor.path, f"tensor {name} has {dimension_count:,} dimensions (at most "
                                          f"{MAX_DIMENSIONS})")
        dimensions = struct.unpack(f"<{dimension_count}Q", cursor.take(8 * dimension_count, what))
        type_number, offset = cursor.number("I", what), cursor.number("Q", what)
        if type_number not in known_types:
            raise unreadable(cursor.path, f"tensor {name} is of type {type_number}, which the gguf package does not "
                                          "know")
        tensor_type = gguf.GGMLQuantizationType(type_number)
        block, block_bytes = gguf.GGML_QUANT_SIZES[tensor_type]  # quantized types: blocks of values along a row
        if dimensions and dimensions[0] % block:
            raise unreadable(cursor.path, f"tensor {name}'s rows of {dimensions[0]:,} values are not whole blocks of "
                                          f"{block} ({tensor_type.name})")
        extents.append((offset, math.prod(dimensions) // block * block_bytes, name))
    return extents


def check_extents(path: Path, extents: list[tuple[int, int, str]], data_size: int, alignment: int) -> None:
    """Each tensor's data inside the data section, at a multiple of the alignment, sharing no byte with another's."""
    end, last = 0, None
    for offset, size, name in sorted(extents):
        if offset % alignment:
            raise unreadable(path, f"tensor {name}'s data starts at byte {offset:,} of the data section, not at a "
                                   f"multiple of the alignment ({alignment}, general.alignment)")
        if offset + size > data_size:
            raise unreadable(path, f"tensor {name}'s data (bytes {offset:,} to {offset + size:,} of the data "
                                   f"section) lies past the end of the file, which holds {data_size:,} bytes of data")
        if size and offset < end:
            raise unreadable(path, f"tensor {name}'s data overlaps that of tensor {last}")
        if size:
            end, last = max(end, offset + size), name


# What the metadata's types hold, for `get`: a float may be stored as a whole number
NUMBER_TYPES = {"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"}
KIND_TYPES = {int: NUMBER_TYPES, float: NUMBER_TYPES | {"FLOAT32", "FLOAT64"}, str: {"STRING"}, bool: {"BOOL"}}
KIND_WORDS = {int: ("a whole number", "whole numbers"), float: ("a number", "numbers"), str: ("text", "texts"),
              bool: ("true or false", "true or false values")}


def holds(names: list[str], kind: type, array: bool) -> bool:
    """Whether a metadata value of these type names (GGUFReader's field.types) holds `kind`, or a list of it."""
    if array:
        return names[:1] == ["ARRAY"] and (len(names) == 1 or len(names) == 2 and names[1] in KIND_TYPES[kind])
    return len(names) == 1 and names[0] in KIND_TYPES[kind]


class GGUFFile:
    """A GGUF file's metadata and tensors, read with the gguf package; every problem is one error naming the file."""

    def __init__(self, path: Union[str, Path]):
        gguf = import_gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"No GGUF file at {self.path}")
        check_layout(self.path)
        try:
            with warnings.catch_warnings():  # numpy's overflow warnings: what they warn of, check_layout refused
                warnings.simplefilter("ignore")
                self.reader = gguf.GGUFReader(str(self.path))
        except Exception as error:  # what check_layout does not look at: a key twice, text that is not UTF-8
            raise unreadable(self.path, f"{type(error).__name__}: {str(error)[:200]}") from None
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}

    def error(self, key: str, problem: str) -> ValueError:
        """An error naming the file and `key` (a metadata key, or "tensor NAME"): `problem`, and what to do."""
        return ValueError(f"{self.path}: {key} {problem}: the file is damaged or was written wrongly (download it "
                          "again, or convert the model again)")

    def get(self, key: str, default: Any = ..., kind: type = None, array: bool = False) -> Any:
        """The value of metadata `key` (`default` if the file lacks it; without a default, an error), checked to
        be of `kind` (int, float, str or bool), or, with `array`, a list of them."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ValueError(f"{self.path} lacks the metadata {key}, which a llama GGUF file holds: it is not a "
                                 "whole llama.cpp model file")
            return default
        names = [value_type.name for value_type in field.types]  # ["ARRAY", "INT32"]; ["ARRAY"] if empty
        if kind is not None and not holds(names, kind, array):
            raise self.error(key, f"holds {' of '.join(names)}, not "
                                  f"{'an array of ' + KIND_WORDS[kind][1] if array else KIND_WORDS[kind][0]}")
        try:
            value = field.contents()
        except UnicodeDecodeError as error:
            raise self.error(key, f"holds text that is not UTF-8 ({error.reason} at byte {error.start})") from None
        if kind is float:
            return [float(v) for v in value] if array else float(value)
        return value

    def shape(self, name: str) -> tuple:
        """Tensor `name`'s shape as torch gives it (ggml lists dimensions innermost first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, dequantized to float32, in our shape."""
        gguf = import_gguf()
        info = self.tensors[name]
        try:
            data = gguf.quants.dequantize(info.data.view(np.uint8), info.tensor_type)  # as bytes: BF16 comes typed
        except NotImplementedError:
            raise ValueError(f"{self.path}: the tensor {name} is of type {info.tensor_type.name}, which the gguf "
                             "package cannot dequantize: convert the model again with another type (F16, Q8_0, Q4_K "
                             "...)") from None
        return torch.from_numpy(np.array(data, dtype=np.float32).reshape(self.shape(name)))  # a copy: read-only file
