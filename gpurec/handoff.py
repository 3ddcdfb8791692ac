"""The hand-off of a batch's arrays to the caller's framework: NumPy, CuPy or PyTorch.

The backends make NumPy arrays (``device="cpu"``) or CuPy arrays on the current GPU
(``device="gpu"``). :func:`hand_off` gives them to the caller as asked, without copying
the images:

- ``"torch"`` on the CPU: ``torch.from_numpy``, a tensor over the NumPy array's memory.
  No CuPy is imported (a CPU-only PyTorch install needs none).
- ``"torch"`` on the GPU: ``torch.from_dlpack`` of the CuPy array. DLPack's protocol is
  stream-safe: torch passes its current stream to ``__dlpack__`` and CuPy makes that
  stream wait for the work queued on CuPy's current stream (where the backend copied the
  batch out of DALI), so a kernel torch launches next sees the finished batch. The
  memory stays CuPy's: once the tensor is dropped, CuPy's pool may hand it to a later
  batch in the order of CuPy's stream, so a model run on another (non-blocking) torch
  stream should synchronise it before dropping the tensor (not run on a GPU here).

The tensor keeps the array alive, so a backend that reuses the buffers of batches nobody
holds any more (both do) does not write into a batch the caller still has.

``label_dtype="int64"`` (for ``CrossEntropyLoss``) converts the float32 labels of the
records; on the host it refuses labels that are not whole numbers rather than truncate
them (on the GPU that check would cost a synchronisation per batch, and is left out).
"""

from __future__ import annotations

from typing import Any

import numpy as np

OUTPUTS = ("numpy", "cupy", "torch")
LABEL_DTYPES = ("float32", "int64")

__all__ = ["LABEL_DTYPES", "OUTPUTS", "check_output", "hand_off", "int64_labels"]


def check_output(output: str | None, device: str) -> str:
    """The output kind for ``device`` (``None``: NumPy on the CPU, CuPy on the GPU), or a
    ``ValueError`` for one that does not live there."""
    if output is None:
        return "cupy" if device == "gpu" else "numpy"
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")
    if output == "numpy" and device == "gpu":
        raise ValueError("output='numpy' is host memory: use device='cpu', or output='cupy' "
                         "or 'torch' on the GPU")  # fmt: skip
    if output == "cupy" and device == "cpu":
        raise ValueError("output='cupy' is GPU memory: use device='gpu', or output='numpy' "
                         "or 'torch' on the CPU")  # fmt: skip
    if output == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ImportError("output='torch' needs PyTorch: pip install torch") from None
    return output


def check_label_dtype(label_dtype: str) -> str:
    if label_dtype not in LABEL_DTYPES:
        raise ValueError(
            f"label_dtype must be one of {', '.join(map(repr, LABEL_DTYPES))}, got {label_dtype!r}"
        )
    return label_dtype


def int64_labels(label: Any, where: str) -> Any:
    """``label`` as int64; NumPy labels that are not whole numbers are refused."""
    if isinstance(label, np.ndarray):
        whole = np.floor(label) == label
        if not whole.all():
            bad = label[~whole].flat[0]
            raise ValueError(f"label_dtype='int64': {where} holds label {float(bad)!r}, not a "
                             "whole number (use label_dtype='float32')")  # fmt: skip
        return label.astype(np.int64)
    return label.astype("int64")  # CuPy: on the device, in stream order


def hand_off(data: Any, label: Any, output: str, label_dtype: str, where: str) -> tuple[Any, Any]:
    """``(data, label)`` as ``output`` arrays, labels as ``label_dtype``; ``where`` names
    the batch in errors."""
    if label_dtype == "int64":
        label = int64_labels(label, where)
    if output == "torch":
        import torch

        if isinstance(data, np.ndarray):
            return torch.from_numpy(data), torch.from_numpy(np.ascontiguousarray(label))
        # GPU: stream-ordered through DLPack (module docstring)
        return torch.from_dlpack(data), torch.from_dlpack(label)
    return data, label
