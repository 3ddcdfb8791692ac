"""``mxnet.ndarray`` (``mx.nd``) of MXNet 1.9.1: the array functions image code calls.

Face-evaluation and gluon scripts move decoded images around with ``mx.nd.array``,
``nd.transpose(img, axes=(2, 0, 1))``, ``mx.ndarray.flip(data=img, axis=2)``,
``nd.stack``/``nd.concat`` and the like, then read them with ``.asnumpy()``. Here these
are NumPy operations returning :class:`gpurec.mxnet.image.NDArray` (a NumPy array with
``asnumpy()``), with MXNet's keyword names, defaults and result types:

- every function returns a new array that owns its memory (MXNet never hands out views
  from these), so writing to a result never changes the input;
- ``array`` makes float32 unless given a dtype or an NDArray (MXNet 1.9.1: the
  source's dtype for an NDArray, float32 for anything else, NumPy arrays included);
- ``concat``'s axis is ``dim`` and defaults to 1, as MXNet's does.

``ctx`` arguments are accepted and ignored: everything is in host memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gpurec.mxnet.image import NDArray

__all__ = [
    "NDArray", "array", "cast", "clip", "concat", "concatenate", "empty", "expand_dims", "flip",
    "full", "ones", "reshape", "reverse", "slice_axis", "split", "squeeze", "stack", "swapaxes",
    "tile", "transpose", "waitall", "zeros",
]  # fmt: skip


def _nd(view: np.ndarray) -> NDArray:
    """A C-contiguous NDArray copy of ``view`` (NumPy's result may alias the input)."""
    return np.array(view, copy=True, order="C").view(NDArray)


def _new(result: np.ndarray) -> NDArray:
    """An NDArray of a result NumPy made afresh (stack, concatenate, tile, clip)."""
    return result.view(NDArray)


def _plain(data: Any) -> np.ndarray:
    return data.view(np.ndarray) if isinstance(data, np.ndarray) else np.asarray(data)


def array(source_array: Any, ctx: Any = None, dtype: Any = None) -> NDArray:
    """``mx.nd.array``: a copy of ``source_array``, float32 unless it is an NDArray
    (whose dtype it keeps) or ``dtype`` says otherwise."""
    if dtype is None:
        dtype = source_array.dtype if isinstance(source_array, NDArray) else np.float32
    return np.array(source_array, dtype=dtype, copy=True).view(NDArray)


def empty(shape: int | Sequence[int], ctx: Any = None, dtype: Any = np.float32) -> NDArray:
    return np.empty(shape, dtype=dtype).view(NDArray)


def zeros(shape: int | Sequence[int], ctx: Any = None, dtype: Any = np.float32, **_) -> NDArray:
    return np.zeros(shape, dtype=dtype).view(NDArray)


def ones(shape: int | Sequence[int], ctx: Any = None, dtype: Any = np.float32, **_) -> NDArray:
    return np.ones(shape, dtype=dtype).view(NDArray)


def full(shape: int | Sequence[int], val: float, ctx: Any = None, dtype: Any = np.float32,
         out: np.ndarray | None = None) -> NDArray:  # fmt: skip
    result = np.full(shape, val, dtype=dtype).view(NDArray)
    if out is not None:
        out[...] = result
        return out
    return result


def transpose(data: np.ndarray, axes: Sequence[int] = ()) -> NDArray:
    """``mx.nd.transpose``: axes permuted (reversed when ``axes`` is empty)."""
    return _nd(np.transpose(_plain(data), tuple(axes) or None))


def flip(data: np.ndarray, axis: int | Sequence[int]) -> NDArray:
    """``mx.nd.flip`` (alias ``reverse``): the order along ``axis`` reversed."""
    return _nd(np.flip(_plain(data), axis=tuple(np.atleast_1d(axis).tolist())))


reverse = flip


def stack(*data: np.ndarray, axis: int = 0, num_args: int | None = None) -> NDArray:
    """``mx.nd.stack``: the arrays joined along a new ``axis``."""
    return _new(np.stack([_plain(d) for d in data], axis=axis))


def concat(*data: np.ndarray, dim: int = 1, num_args: int | None = None) -> NDArray:
    """``mx.nd.concat``: the arrays joined along the existing axis ``dim`` (default 1)."""
    return _new(np.concatenate([_plain(d) for d in data], axis=dim))


def concatenate(arrays: Sequence[np.ndarray], axis: int = 0, always_copy: bool = True) -> NDArray:
    """``mx.nd.concatenate``: a list of arrays joined along ``axis`` (default 0)."""
    return _new(np.concatenate([_plain(a) for a in arrays], axis=axis))


def split(data: np.ndarray, num_outputs: int, axis: int = 1, squeeze_axis: bool = False):
    """``mx.nd.split``: ``num_outputs`` equal parts along ``axis`` (a list, or the one
    array when ``num_outputs`` is 1)."""
    parts = np.split(_plain(data), num_outputs, axis=axis)
    if squeeze_axis:
        parts = [p.squeeze(axis=axis) for p in parts]
    out = [_nd(p) for p in parts]
    return out[0] if num_outputs == 1 else out


def expand_dims(data: np.ndarray, axis: int) -> NDArray:
    return _nd(np.expand_dims(_plain(data), axis))


def squeeze(data: np.ndarray, axis: int | Sequence[int] | None = None) -> NDArray:
    return _nd(np.squeeze(_plain(data), axis=None if axis is None else tuple(np.atleast_1d(axis))))


def reshape(data: np.ndarray, shape: Sequence[int], reverse: bool = False) -> NDArray:
    """``mx.nd.reshape`` with plain shapes (``-1`` infers one axis; MXNet's special
    codes 0, -2, -3, -4 are not supported)."""
    shape = tuple(shape)
    if any(s < -1 for s in shape) or (0 in shape and _plain(data).size):
        raise ValueError(f"reshape: MXNet's special shape codes are not supported: {shape}")
    return _nd(np.reshape(_plain(data), shape))


def swapaxes(data: np.ndarray, dim1: int = 0, dim2: int = 0) -> NDArray:
    return _nd(np.swapaxes(_plain(data), dim1, dim2))


def slice_axis(data: np.ndarray, axis: int, begin: int, end: int | None) -> NDArray:
    """``mx.nd.slice_axis``: ``data[begin:end]`` along ``axis``."""
    index = [slice(None)] * _plain(data).ndim
    index[axis] = slice(begin, end)
    return _nd(_plain(data)[tuple(index)])


def tile(data: np.ndarray, reps: Sequence[int]) -> NDArray:
    return _new(np.tile(_plain(data), tuple(reps)))


def cast(data: np.ndarray, dtype: Any) -> NDArray:
    """``mx.nd.cast``: a copy converted to ``dtype`` (float to int truncates, as MXNet)."""
    return _plain(data).astype(dtype, copy=True).view(NDArray)


def clip(data: np.ndarray, a_min: float, a_max: float) -> NDArray:
    return _new(np.clip(_plain(data), a_min, a_max).astype(_plain(data).dtype, copy=False))


def waitall() -> None:
    """Nothing to wait for: these operations are synchronous."""
