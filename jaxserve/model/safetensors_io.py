"""A reader for the ``safetensors`` format: memory-mapped numpy views, bfloat16 included.

Format: an 8-byte little-endian header length, a JSON header mapping tensor names to ``dtype``,
``shape`` and ``data_offsets`` (relative to the end of the header), then the raw bytes. Reading it
directly (rather than through a framework binding) gives zero-copy views in every dtype jaxserve
loads, and error messages that name the file and the tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from jaxserve.model.config import CheckpointError

DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_header(path: str) -> tuple[dict, int]:
    """``(header without __metadata__, byte offset of the data section)``."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        n = int.from_bytes(prefix, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header length {n}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{path}: safetensors header is not valid JSON ({e})"
            ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def load_file(path: str) -> dict[str, np.ndarray]:
    """Every tensor of one file as a read-only memory-mapped numpy array."""
    header, data_start = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}"
            )
        shape = tuple(info.get("shape", ()))
        begin, end = info.get("data_offsets", (0, -1))
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or data_start + end > data.size:
            raise CheckpointError(
                f"{path}: tensor {name!r} data_offsets {begin}..{end} do not match dtype {info['dtype']} and shape {shape}"
            )
        out[name] = (
            data[data_start + begin : data_start + end].view(dtype).reshape(shape)
        )
    return out


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of a HF model dir: the sharded index's files, or ``model.safetensors``,
    or every ``*.safetensors`` in the directory."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index}: expected a JSON object with a 'weight_map' ({e})"
            ) from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            raise CheckpointError(
                f"{index} lists shard(s) that do not exist: {missing}"
            )
        return [os.path.join(model_dir, f) for f in files]
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    files = (
        sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
        if os.path.isdir(model_dir)
        else []
    )
    if not files:
        raise CheckpointError(f"{model_dir!r} has no *.safetensors weights")
    return [os.path.join(model_dir, f) for f in files]


def iter_tensors(model_dir: str) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, array)`` for every tensor of the checkpoint, file by file."""
    seen: dict[str, str] = {}
    for path in checkpoint_files(model_dir):
        for name, array in load_file(path).items():
            if name in seen:
                raise CheckpointError(
                    f"tensor {name!r} appears in both {seen[name]} and {path}"
                )
            seen[name] = path
            yield name, array


def save_file(
    tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None
) -> None:
    """Writes numpy arrays as one safetensors file (tests and converters)."""
    names = {np.dtype(v): k for k, v in DTYPES.items()}
    header, offset, arrays = {}, 0, []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in names:
            raise ValueError(
                f"tensor {name!r}: dtype {array.dtype} cannot be stored in safetensors"
            )
        header[name] = {
            "dtype": names[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())
