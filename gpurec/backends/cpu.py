"""The CPU backend: gpurec's reader, OpenCV decoding, MXNet's augmenter steps, NumPy out.

For machines without DALI. A thread pool works on a few images per task (OpenCV and
NumPy release the GIL), a few batches ahead of the trainer. The random numbers of a
batch come from :meth:`gpurec.Pipeline.draws` (``(seed, epoch, batch, rank)``), before
any thread runs; :func:`gpurec.draws.geometry` and :func:`gpurec.draws.colour` turn them
and an image's size (read from its JPEG/PNG/GIF header, before decoding) into that
image's steps. The batches are the same bit for bit whatever the thread count or timing,
and the DALI backend applies the same windows, matrices and factors.

Geometry, two paths:

* **axis-aligned** (no rotation, shear, random scale or stretch): MXNet's own OpenCV
  calls, one by one: ``cv2.resize`` of the shorter edge, ``cv2.copyMakeBorder`` for
  ``pad``, the enlargement of an image smaller than the data shape (in MXNet's two
  steps, height then width), the window, and its ``cv2.resize`` to the data shape. For
  deterministic configurations this is MXNet's output up to its JPEG decoder.
* **warped**: MXNet resizes, warps the whole image onto a canvas, pads and crops; here
  the resize step runs as MXNet's (a warp does not low-pass filter a shrink, and a small
  image warped straight to a large size would blend the fill into all of it). When the
  window is of the data shape at the canvas' resolution and nothing is padded (the
  usual training recipe), the rest (warp, crop) is one ``cv2.warpAffine`` straight to
  the output size with the composed map (``Geometry.matrix``), filled with
  ``fill_value``: the same map sampled once, faster; a crop by whole pixels samples
  MXNet's warp's positions (``tests/test_augment_cpu.py``: at most 1 level off MXNet's
  steps), an enlargement of a small canvas is within interpolation noise. Otherwise
  (:func:`_staged`: the window is resized, or padding surrounds the warped canvas) the
  steps run apart as MXNet's: ``cv2.warpAffine`` onto MXNet's canvas, then the
  axis-aligned path's padding, enlargement, window and window resize. One warp cannot
  do that: MXNet's canvas clips the warped image, and the window resize (or the
  enlargement) blends the canvas edge with the padding's fill, which a warp to the
  output cut at the canvas edge does not (measured before this path existed: mean
  0.9-4.3, 99th percentile 10-73 levels off MXNet's steps; now at most 1 level).
  ``cv2.INTER_AREA`` is not a warp interpolation: OpenCV warps with it as
  linear, as MXNet's warp does.

Reduced JPEG decoding (libjpeg's DCT scaling at 1/2, 1/4 or 1/8: a fraction of the
decode time) is used only where it stands in for an area-averaging shrink MXNet does
anyway, and only by at most half that shrink, so that it changes the output by
interpolation noise only:

* the resize step uses ``cv2.INTER_AREA`` (``interp="area"``, or ``"auto"`` shrinking)
  and shrinks by at least twice the denominator in both directions: the reduced image is
  area-resized to MXNet's resized size;
* there is no resize step and no ``pad``, the image is axis-aligned and its window is
  resized to the data shape with ``cv2.INTER_AREA``, shrinking by at least twice the
  denominator: the window is cut from the reduced image (its edges rounded to reduced
  pixels: at most a quarter of an output pixel) and area-resized.

Measured on 640x480 photo-like JPEGs (blurred noise, gradients, hard-edged discs;
``tests/test_augment_cpu.py::test_reduced_decoding_stays_within_interpolation_noise``),
mean |difference| to MXNet's steps on the full decode, and its 99th percentile, in
levels: a shrink of 4.3 decoded at 1/2: 0.38, 2; at 1/4: 1.1, 6 (not allowed); a shrink
of 8 at 1/4: 0.28, 2; a shrink of 2.1 at 1/2: 0.65, 4 (not allowed); random-resized
64x64 windows (shrinks of 4 and more) cut from the 1/2 decode: 0.72, 5. With
``"linear"`` (MXNet's default ``inter_method=1``), ``"cubic"`` and the others, a shrink
aliases in MXNet, which reduced decoding would not reproduce: the full image is decoded.

Colour, on the output-size crop: brightness, contrast and saturation as one
``cv2.transform`` (``Colour.matrix`` on RGB, the mean gray of the crop); HSL offsets as
a 256-entry table per channel in OpenCV's HLS space (clamped, not wrapped, as MXNet
does); PCA noise as a table per channel (``int(x + offset)`` clamped, MXNet's integer
arithmetic). Then one pass per channel straight into the batch: mirror, BGR to RGB,
``(x - mean) * mult + bias`` in float32 (MXNet's normaliser and order of operations) and
the cast, as a ``cv2.LUT`` table per channel made with that very arithmetic on every
uint8 value, so it is bit-identical to computing it per pixel. The tables depend on the
image only through the normaliser's jitter (``max_random_contrast``,
``max_random_illumination``): without it they are made once, with it per image (256
values each). ``mean_image`` is subtracted per pixel, before the mirror (MXNet
subtracts ``meanimg[i][j]`` from the unmirrored pixel and writes it mirrored).

Memory is reused rather than allocated per image: each thread resizes, warps, mirrors
and splits into its own scratch images, and a batch array the caller no longer
references is filled again (fresh ones cost a page fault per 4 KiB). Tasks hold several
images each, so the executor's per-task cost is paid a few times per batch.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import cv2
import numpy as np

from gpurec.augment import AugmentSpec
from gpurec.backends.common import label_of, reusable, size_only, stand_in_candidates
from gpurec.backends.common import round_half_away as _round_half_away
from gpurec.backends.common import staged as _staged
from gpurec.backends.records import RecordTable
from gpurec.draws import AREA, LUMA, Colour, Draws, Geometry, colour, enlarge_side, geometry
from gpurec.recordio import RecordIOError, unpack_view
from gpurec.transcode import ImageError, ImageInfo, UnknownImage, sniff

if TYPE_CHECKING:
    from gpurec.order import Plan
    from gpurec.pipeline import Pipeline

__all__ = ["CPUBackend", "reduction"]

_FULL = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # MXNet ignores EXIF orientation
_REDUCED = {
    1: _FULL,
    2: cv2.IMREAD_REDUCED_COLOR_2 | cv2.IMREAD_IGNORE_ORIENTATION,
    4: cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION,
    8: cv2.IMREAD_REDUCED_COLOR_8 | cv2.IMREAD_IGNORE_ORIENTATION,
}
_HLS_LIMITS = (180, 255, 255)  # MXNet clamps H, L and S to these (H is not wrapped)
# Images normalised together (CPUBackend._normalise): few enough that their planes and
# float32 rows stay in a core's L2 cache through the three passes (64 at once ran from
# memory: 1.5x the time), many enough that the GIL changes hands rarely.
_GROUP = 4


def reduction(geo: Geometry, spec: AugmentSpec) -> int:
    """libjpeg's scale denominator (1, 2, 4 or 8) for a JPEG of geometry ``geo``: > 1
    only where the reduced decode stands in for an area shrink MXNet does anyway (the
    module docstring gives the rule)."""
    width, height = geo.source
    if geo.resized is not None:
        if geo.interps["resize"] != AREA:
            return 1
        shrink = min(width / geo.resized[0], height / geo.resized[1])
    elif geo.axis_aligned and geo.resize_window and not geo.pad and geo.interps["window"] == AREA:
        _, _, w, h = geo.window
        shrink = min(w / spec.width, h / spec.height)
    else:
        return 1
    shrink /= 2  # a DCT-scaled image is sharper than an area average: keep a margin
    for denom in (8, 4, 2):
        if shrink >= denom:
            return denom
    return 1


def _spare(img: np.ndarray, scratch: list[np.ndarray]) -> np.ndarray:
    """A scratch image of the output size to write a step of ``img`` into: not ``img``
    itself (OpenCV's steps do not all work in place). Scratch 0 holds the geometry's
    output, so it is free once a colour step has read it."""
    return scratch[0] if img is scratch[1] else scratch[1]


def _tables(spec: AugmentSpec, mult: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``(3, 256)`` tables (RGB): what normalising and casting make of each uint8 value.

    MXNet's arithmetic (``ProcessImage``): ``(x - mean) * mult + bias`` in float32, cast
    to the dtype; ``int8``: ``saturate(x - round(mean))``; ``uint8``: the value. A lookup
    is bit-identical to computing it per pixel.
    """
    values = np.arange(256, dtype=np.float32)[None, :]
    mean = np.array(spec.mean, np.float32)[:, None]
    if spec.dtype == "int8":
        return np.clip(values - _round_half_away(mean), -128, 127).astype(np.int8)
    if spec.dtype == "uint8":
        return np.repeat(values, 3, axis=0).astype(np.uint8)
    out = (values - mean) * mult.astype(np.float32)[:, None] + bias.astype(np.float32)[:, None]
    return out.astype(spec.dtype)


class _Luts:
    """The normalising tables of one (mult, bias), in the forms ``cv2.LUT`` takes: one
    per RGB plane, and one for an RGB image (float16 as its uint16 bits)."""

    def __init__(self, spec: AugmentSpec, mult: np.ndarray, bias: np.ndarray) -> None:
        self.key = (mult.tobytes(), bias.tobytes())
        tables = _tables(spec, mult, bias)
        if tables.dtype == np.float16:
            tables = tables.view(np.uint16)
        self.planes = [np.ascontiguousarray(t) for t in tables]  # R, G, B
        self.rgb = np.ascontiguousarray(tables.T.reshape(256, 1, 3))


# CPU backends alive in this process. A forked child (a DataLoader worker, a
# multiprocessing pool) inherits their thread pools without the threads: a batch asked
# for there would wait forever. The child gets pools (and scratch images) of its own.
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _new_pools_in_child() -> None:
    for backend in list(_LIVE):
        backend._pool = backend._new_pool()
        backend._local = threading.local()


os.register_at_fork(after_in_child=_new_pools_in_child)


class CPUBackend:
    """Turns a batch of record indices into a NumPy batch (see module docstring)."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.spec = spec = pipe.spec
        self.dataset = pipe.dataset
        self.label_width = pipe.label_width
        self._dtype = np.dtype(spec.dtype)
        self._nchw = spec.layout == "NCHW"
        self._view = np.uint16 if self._dtype == np.float16 else None  # float16 LUT bits
        self._lookup = self._dtype != np.uint8  # uint8 holds the pixels as they are
        # float32 CHW: _tables' arithmetic (cv2.LUT to float32 costs twice the three
        # float32 operations; the result is the same to the bit), on many images at once
        # (_planes, then _normalise for the task's images)
        self._planar = self._nchw and self._dtype == np.float32 and spec.mean_image is None
        self._mean32 = np.array(spec.mean, np.float32)[:, None, None]
        self._mean_image = spec.mean_image  # (3, H, W) RGB, float32
        if spec.mean_image is not None and spec.dtype == "int8":
            self._mean_image = _round_half_away(spec.mean_image).astype(np.int16)
        self._local = threading.local()  # per-thread scratch images and tables, reused
        self._table = RecordTable(self.dataset, self.label_width)  # records read before
        self._by_size: dict | None = {} if size_only(spec) else None  # geometry per size
        # Batches handed out, reused once nobody holds them any more (see _new_batch).
        self._handed: deque[np.ndarray] = deque(maxlen=pipe.prefetch + 3)
        cv2.setNumThreads(1)  # parallelism comes from our threads
        self._pool = self._new_pool()
        _LIVE.add(self)
        # Images per task: a batch in about 2 tasks per thread, so the executor's cost is
        # paid a few times per batch while every thread still has work at a batch's end.
        self._chunk = max(1, math.ceil(pipe.batch_size / (2 * pipe.num_threads)))

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.pipe.num_threads, thread_name_prefix="gpurec-cpu")

    # ---------------------------------------------------------------------- records
    def _unpack(self, index: int):
        try:
            return unpack_view(self.dataset.read_view(index))
        except RecordIOError as exc:
            raise self._error(index, exc.reason) from None

    def _error(self, index: int, reason: str) -> RecordIOError:
        """An error naming the shard, the record and its byte offset."""
        return self.dataset.error(index, reason)

    def _label(self, header, index: int) -> np.ndarray:
        return label_of(header, self.label_width, self.dataset, index)

    # ----------------------------------------------------------------------- pixels
    def _scratch(self) -> list[np.ndarray]:
        """This thread's reusable output-size images (resized/warped, colour, mirrored,
        three planes, a float plane, and with :attr:`_planar` the RGB planes of a task's
        images): fresh arrays per image would cost page faults, as the allocator hands big
        ones back."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            h, w = self.spec.height, self.spec.width
            scratch = [np.empty((h, w, 3), np.uint8) for _ in range(3)]
            scratch += [np.empty((h, w), np.uint8) for _ in range(3)]
            scratch.append(np.empty((h, w), np.float32))
            if self._planar:
                scratch.append(np.empty((_GROUP, 3, h, w), np.uint8))
            self._local.scratch = scratch
        return scratch

    def _decode(self, payload, flags: int) -> np.ndarray:
        try:
            img = cv2.imdecode(np.frombuffer(payload, np.uint8), flags)
        except cv2.error:
            img = None
        # Kept until the next decode of this task: freeing it first would let the
        # allocator hand the memory back to the kernel and fault it in again each image.
        self._local.decoded = img
        if img is None:
            try:
                info = sniff(payload)
            except ImageError as exc:
                raise ImageError(f"cannot decode image: {exc}") from None
            raise ImageError(f"cannot decode image ({info.format})")
        return img

    def _info(self, payload) -> ImageInfo:
        """The image's signature and header size (:func:`gpurec.transcode.sniff`)."""
        try:
            return sniff(payload)
        except UnknownImage:  # OpenCV decides (Sun raster, PFM...), as the DALI backend does
            return ImageInfo("unknown")
        except ImageError as exc:  # a known format, broken (cut short...): refused, as
            raise ImageError(f"cannot decode image: {exc}") from None  # on DALI

    def _geometry_of(self, d: Draws, k: int, width: int, height: int) -> Geometry:
        """:func:`gpurec.draws.geometry`, once per image size when it takes no draw."""
        if self._by_size is None:
            return geometry(self.spec, d, k, width, height)
        geo = self._by_size.get((width, height))
        if geo is None:
            geo = self._by_size[width, height] = geometry(self.spec, d, k, width, height)
        return geo

    def _decoded(self, payload, d: Draws, k: int,
                 info: ImageInfo) -> tuple[np.ndarray, Geometry, int]:  # fmt: skip
        """Decode image ``k`` (reduced where :func:`reduction` allows), whose signature
        and header size are ``info``: the pixels (BGR), its geometry, and the scale
        denominator it was decoded at."""
        spec = self.spec
        geo = None
        denom = 1
        if info.width and info.height:
            geo = self._geometry_of(d, k, info.width, info.height)
            if info.format == "jpeg":
                denom = reduction(geo, spec)
        img = self._decode(payload, _REDUCED[denom])
        dh, dw = img.shape[:2]
        if geo is not None and denom > 1:
            if (dw, dh) == (-(-info.width // denom), -(-info.height // denom)):
                return img, geo, denom
            img = self._decode(payload, _FULL)  # the header did not tell the truth
            dh, dw = img.shape[:2]
        if geo is None or (dw, dh) != geo.source:
            geo = self._geometry_of(d, k, dw, dh)
        return img, geo, 1

    def _geometry(self, img: np.ndarray, geo: Geometry, denom: int,
                  scratch: list[np.ndarray]) -> np.ndarray:  # fmt: skip
        """The geometric steps: ``(height, width, 3)`` uint8 BGR of the output size."""
        spec = self.spec
        size = (spec.width, spec.height)
        fill = (spec.fill_value,) * 3
        if geo.resized is not None and img.shape[1::-1] != geo.resized:
            # MXNet's step, on both paths: a warp does not low-pass filter a shrink, and
            # warping a small image straight from the source would blend the fill into
            # the whole enlargement (its edge pixels are half fill when sampled directly)
            img = cv2.resize(img, geo.resized, interpolation=geo.interps["resize"])
        elif denom > 1:  # no resize step: the window is cut from the reduced image
            x, y, w, h = geo.window
            dh, dw = img.shape[:2]
            x0, y0 = min(dw - 1, round(x / denom)), min(dh - 1, round(y / denom))
            x1 = min(dw, max(x0 + 1, round((x + w) / denom)))
            y1 = min(dh, max(y0 + 1, round((y + h) / denom)))
            return cv2.resize(img[y0:y1, x0:x1], size, dst=scratch[0],
                              interpolation=geo.interps["window"])  # fmt: skip
        if not geo.axis_aligned:
            if not _staged(spec):
                return self._warp(img, geo, scratch[0])
            # MXNet's warp onto its canvas; the padding, enlargement and window follow
            img = cv2.warpAffine(img, geo.warp, geo.canvas, flags=geo.interps["warp"],
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=fill)  # fmt: skip
        if geo.pad:
            p = geo.pad
            img = cv2.copyMakeBorder(img, p, p, p, p, cv2.BORDER_CONSTANT, value=fill)
        if geo.enlarged is not None:  # MXNet's two steps: the height, then the width
            interp = geo.interps["enlarge"]
            h, w = img.shape[:2]
            if h < spec.height:  # MXNet's float32 arithmetic, as gpurec.draws.geometry's
                img = cv2.resize(img, (enlarge_side(spec.height, h, w), spec.height),
                                 interpolation=interp)  # fmt: skip
            if img.shape[1::-1] != geo.enlarged:
                img = cv2.resize(img, geo.enlarged, interpolation=interp)
        x, y, w, h = geo.window
        img = img[y : y + h, x : x + w]
        if geo.resize_window:
            img = cv2.resize(img, size, dst=scratch[0], interpolation=geo.interps["window"])
        return img

    def _warp(self, img: np.ndarray, geo: Geometry, dst: np.ndarray) -> np.ndarray:
        """Warp and crop as one ``cv2.warpAffine`` of ``img`` (the source, or MXNet's
        resized image when that step ran), for geometries that are not :func:`_staged`
        (no padding, a data-shape window, possibly enlarged)."""
        spec = self.spec
        matrix = np.vstack([geo.matrix, [0, 0, 1]])
        if img.shape[1::-1] != geo.source:  # the resize step ran: map from its output
            sx, sy = geo.resized[0] / geo.source[0], geo.resized[1] / geo.source[1]
            resize = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])
            matrix = matrix @ np.linalg.inv(resize)
        fill = (spec.fill_value,) * 3
        out = cv2.warpAffine(img, matrix[:2], (spec.width, spec.height), dst=dst,
                             flags=geo.interps["composed"], borderMode=cv2.BORDER_CONSTANT,
                             borderValue=fill)  # fmt: skip
        return out

    def _colour(self, img: np.ndarray, col: Colour, scratch: list[np.ndarray]) -> np.ndarray:
        """Brightness/contrast/saturation, HSL offsets and PCA noise, on BGR ``img``."""
        if col.matrix is not None:
            b, g, r = cv2.mean(img)[:3]
            mean_gray = float(LUMA @ np.array([r, g, b], np.float32))
            m = col.matrix[::-1, ::-1]  # the RGB matrix acting on BGR vectors
            affine = np.hstack([m, (col.gray[::-1] * mean_gray)[:, None]]).astype(np.float32)
            img = cv2.transform(img, affine, dst=_spare(img, scratch))
        if col.hsl is not None:
            values = np.arange(256, dtype=np.int32)[:, None]
            table = np.clip(values + col.hsl.astype(np.int32)[None, :], 0,
                            np.array(_HLS_LIMITS)[None, :])  # fmt: skip
            hls = cv2.cvtColor(img, cv2.COLOR_BGR2HLS, dst=_spare(img, scratch))
            img = cv2.LUT(hls, table.astype(np.uint8).reshape(256, 1, 3),
                          dst=_spare(hls, scratch))  # fmt: skip
            img = cv2.cvtColor(img, cv2.COLOR_HLS2BGR, dst=_spare(img, scratch))
        if col.pca is not None:  # MXNet: int v += float offset (truncates), then clamps
            offsets = col.pca[::-1].astype(np.float32)  # B, G, R
            values = np.arange(256, dtype=np.float32)[:, None] + offsets[None, :]
            table = np.clip(np.trunc(values), 0, 255).astype(np.uint8)
            img = cv2.LUT(img, table.reshape(256, 1, 3), dst=_spare(img, scratch))
        return img

    def _luts(self, d: Draws, k: int) -> _Luts:
        """This image's normalising tables: the last ones this thread made, when the
        normaliser does not jitter (or happened to draw the same)."""
        luts = getattr(self._local, "luts", None)
        if luts is None or luts.key != (d.mult[k].tobytes(), d.bias[k].tobytes()):
            luts = self._local.luts = _Luts(self.spec, d.mult[k], d.bias[k])
        return luts

    def _write(self, img: np.ndarray, d: Draws, k: int, dst: np.ndarray,
               scratch: list[np.ndarray]) -> None:  # fmt: skip
        """Mirror, RGB order, normalise, cast and lay out BGR ``img`` into ``dst``."""
        mirror = bool(d.mirror[k])
        if self._mean_image is not None:
            self._write_mean_image(img, d, k, mirror, dst, scratch)
            return
        if mirror:
            img = cv2.flip(img, 1, dst=scratch[2])
        luts = self._luts(d, k) if self._lookup else None
        if self._nchw:
            planes = cv2.split(img, scratch[3:6])[::-1]  # R, G, B
            for c in range(3):
                out = dst[c]
                if luts is None:
                    np.copyto(out, planes[c])
                    continue
                if self._view is not None:
                    out = out.view(self._view)
                if cv2.LUT(planes[c], luts.planes[c], dst=out) is not out:
                    raise RuntimeError("cv2.LUT did not write into the batch")  # pragma: no cover
            return
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=_spare(img, scratch))
        if luts is None:
            np.copyto(dst, img)
            return
        out = dst if self._view is None else dst.view(self._view)
        if cv2.LUT(img, luts.rgb, dst=out) is not out:
            raise RuntimeError("cv2.LUT did not write into the batch")  # pragma: no cover

    @staticmethod
    def _planes(img: np.ndarray, mirror: bool, slot: np.ndarray, scratch: list[np.ndarray]) -> None:
        """BGR ``img`` as mirrored (if so drawn) RGB planes into ``slot`` (``(3, h, w)``
        uint8), for :meth:`_normalise` (the :attr:`_planar` layout)."""
        if mirror:
            img = cv2.flip(img, 1, dst=scratch[2])
        planes = [slot[2], slot[1], slot[0]]  # B, G, R
        if any(a is not b for a, b in zip(cv2.split(img, planes), planes, strict=True)):
            raise RuntimeError("cv2.split did not write into the planes")  # pragma: no cover

    def _normalise(self, planes: np.ndarray, d: Draws, first: int, dst: np.ndarray) -> None:
        """``(x - mean) * mult + bias`` in float32 (:func:`_tables`' arithmetic, the same
        bits) of the uint8 RGB ``planes`` (``(m, 3, h, w)``) of batch positions
        ``first..first + m``, into ``dst`` (their ``(m, 3, h, w)`` float32 rows).

        Three ufunc calls for :data:`_GROUP` images, not nine per image: each NumPy or
        OpenCV call releases the GIL and takes it back, and with two threads those
        handovers cost more than the arithmetic of a 112-px image (BENCHMARKS.md, issue
        21). Adding a bias of 0 is left out where every multiplier is positive: ``y + 0``
        is ``y`` for every float but -0, which a positive multiplier never makes here
        (``x - mean`` is +0 where ``x == mean``)."""
        m = len(planes)
        mult, bias = d.mult[first : first + m], d.bias[first : first + m]
        np.subtract(planes, self._mean32, out=dst, dtype=np.float32)
        np.multiply(dst, mult[:, :, None, None], out=dst)
        if bias.any() or not (mult > 0).all():
            np.add(dst, bias[:, :, None, None], out=dst)

    def _write_mean_image(self, img: np.ndarray, d: Draws, k: int, mirror: bool,
                          dst: np.ndarray, scratch: list[np.ndarray]) -> None:  # fmt: skip
        """``mean_image``: MXNet subtracts ``meanimg[c][i][j]`` from pixel (i, j) and
        writes the result at the mirrored position, so the mirror comes last."""
        planes = cv2.split(img, scratch[3:6])[::-1]  # R, G, B
        work = scratch[6]
        for c in range(3):
            if self.spec.dtype == "int8":
                value = np.clip(planes[c].astype(np.int16) - self._mean_image[c], -128, 127)
            else:
                np.subtract(planes[c], self._mean_image[c], out=work, dtype=np.float32)
                np.multiply(work, d.mult[k, c], out=work)
                value = np.add(work, d.bias[k, c], out=work)
            if mirror:
                value = value[:, ::-1]
            out = dst[c] if self._nchw else dst[..., c]
            np.copyto(out, value, casting="unsafe")

    def _sample(self, index: int, d: Draws, k: int, data: np.ndarray, labels: np.ndarray,
                scratch: list[np.ndarray], slot: np.ndarray | None = None,
                known: tuple | None = None) -> None:  # fmt: skip
        """Record ``index`` as image ``k`` of its batch, with that image's draws. A
        record read before comes from what its first read learned (:attr:`_table`: no
        header parsed, nothing sniffed; ``known``: that already gathered, its image bytes
        and :class:`ImageInfo`, the label already in ``labels[k]``); it is learned once it
        passed every step. With ``slot`` (the :attr:`_planar` layout) the image's RGB
        planes are left there for the caller to :meth:`_normalise`; without, it is
        written to ``data[k]``."""
        table = self._table
        if known is None and table.start[index]:
            known = self._known(np.array([index]))[0]
            labels[k] = table.label[index]
        learned = known is not None
        if learned:
            payload, info = known
        else:
            header, payload = self._unpack(index)
            labels[k] = self._label(header, index)
        try:
            if not learned:
                info = self._info(payload)
            img, geo, denom = self._decoded(payload, d, k, info)
        except ImageError as exc:
            raise self._error(index, str(exc)) from None
        img = self._geometry(img, geo, denom, scratch)
        img = self._colour(img, colour(self.spec, d, k), scratch)
        if slot is not None:
            self._planes(img, bool(d.mirror[k]), slot, scratch)
        elif self._planar:
            one = scratch[7][:1]
            self._planes(img, bool(d.mirror[k]), one[0], scratch)
            self._normalise(one, d, k, data[k : k + 1])
        else:
            self._write(img, d, k, data[k], scratch)
        if not learned and info.width and info.height:
            table.learn(index, payload, (info.width, info.height), labels[k],
                        info.format == "jpeg")  # fmt: skip

    def _known(self, indices: np.ndarray) -> list[tuple | None]:
        """Per sample of ``indices``: its image bytes (a view of the map) and
        :class:`ImageInfo` from :attr:`_table` when it is learned, else None; gathered
        for all of them at once."""
        table = self._table
        rows = np.flatnonzero(table.known(indices))
        known: list[tuple | None] = [None] * len(indices)
        if len(rows):
            learned = indices[rows]
            sizes, jpeg = table.size[learned].tolist(), table.jpeg[learned].tolist()
            for r, payload, (w, h), j in zip(rows.tolist(), table.payloads(learned), sizes, jpeg,
                                              strict=True):  # fmt: skip
                known[r] = payload, ImageInfo("jpeg" if j else "other", w, h)
        return known

    def _task(self, items: list[tuple[int, int]], d: Draws, data: np.ndarray,
              labels: np.ndarray, stop_at_error: bool) -> list[tuple[int, Exception]]:  # fmt: skip
        """Several images of a batch (consecutive positions), in order; the errors, by
        position in the batch. The learned records' bytes, sizes and labels are gathered
        for all of them first (:meth:`_known`)."""
        errors = []
        scratch = self._scratch()
        planes = scratch[7] if self._planar else None
        pending = 0  # with planes: the last images, whose planes await _normalise
        indices = np.array([index for _, index in items], np.int64)
        known = self._known(indices)
        first = items[0][0] if items else 0
        rows = [r for r, x in enumerate(known) if x is not None]
        if rows:
            labels[first + np.array(rows)] = self._table.label[indices[rows]]

        def normalise(end: int) -> None:  # the pending images, up to position end
            self._normalise(planes[:pending], d, end - pending, data[end - pending : end])

        try:
            for j, (k, index) in enumerate(items):
                try:
                    self._sample(index, d, k, data, labels, scratch,
                                 None if planes is None else planes[pending], known[j])  # fmt: skip
                except Exception as exc:
                    errors.append((k, exc))
                    if pending:
                        normalise(k)
                        pending = 0
                    if stop_at_error:
                        break
                    continue
                if planes is not None:
                    pending += 1
                    if pending == _GROUP:
                        normalise(k + 1)
                        pending = 0
            else:
                if pending:
                    normalise(items[-1][0] + 1)
        finally:
            self._local.decoded = None
        return errors

    # ----------------------------------------------------------------------- batches
    def _new_batch(self, n: int) -> np.ndarray:
        """An array for the next batch: one handed out before that nothing refers to any
        more (:func:`gpurec.backends.common.reusable`), or else a new one."""
        shape = self.spec.batch_shape(n)
        buf = reusable(self._handed, shape)
        return np.empty(shape, self._dtype) if buf is None else buf

    def _submit(self, plan: Plan, b: int):
        indices = plan.batch(b)
        n = len(indices)
        data = self._new_batch(n)
        labels = np.empty((n, self.label_width), np.float32)
        d = self.pipe.draws(plan, b, n)
        items = list(enumerate(indices.tolist()))
        stop = self.pipe.on_error == "raise"
        futures = [
            self._pool.submit(self._task, items[k : k + self._chunk], d, data, labels, stop)
            for k in range(0, n, self._chunk)
        ]
        return data, labels, futures

    def _collect(self, data, labels, futures: list[Future], plan: Plan, b: int):
        errors: list[tuple[int, Exception]] = []
        try:
            for future in futures:
                errors += future.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        failed = []
        for i, exc in errors:  # in batch order: tasks hold consecutive images
            if self.pipe.on_error == "raise" or not isinstance(exc, RecordIOError):
                for f in futures:
                    f.cancel()
                raise exc
            failed.append(i)
        if failed:
            self._stand_ins(data, labels, failed, plan, b, errors[0][1])
            reads = plan.reads(b)  # a bad last record counts once, not per padding copy
            self.pipe.skipped += sum(1 for k in failed if k < reads)
        return data, labels

    def _stand_ins(self, data, labels, failed: list[int], plan: Plan, b: int,
                   first: Exception) -> None:  # fmt: skip
        """Fill the failed positions of batch ``b``: the k-th gets the k-th good record of
        the batch (cyclic), or :meth:`_stand_in`'s record when there is none, augmented
        with the failed position's own draws (every position has its draws, whatever
        record it ends up holding), as the DALI backend does, so both backends hand out
        the same images."""
        d = self.pipe.draws(plan, b, len(data))
        indices = plan.batch(b).tolist()
        good = sorted(set(range(len(data))) - set(failed))
        scratch = self._scratch()
        try:
            if good:
                for k, i in enumerate(failed):
                    self._sample(indices[good[k % len(good)]], d, i, data, labels, scratch)
                return
            index = self._stand_in(data, labels, failed[0], d, plan, b, first)
            for i in failed[1:]:
                self._sample(index, d, i, data, labels, scratch)
        finally:
            self._local.decoded = None

    def _stand_in(self, data, labels, position: int, d: Draws, plan: Plan, b: int,
                  first: Exception) -> int:  # fmt: skip
        """For a batch with no good record (a bad last record and its padding): the
        nearest record before the batch in the rank's plan (going back, then on from the
        plan's end) that decodes, written at ``position`` with its draws; the DALI backend
        picks by this rule. Returns the record's index."""
        scratch = self._scratch()
        for index in stand_in_candidates(plan, b, {int(i) for i in plan.batch(b)}):
            try:
                self._sample(index, d, position, data, labels, scratch)
                return index
            except RecordIOError:
                continue
        raise RecordIOError(f"no record of the epoch decodes (first: {first})")

    def run_epoch(self, plan: Plan, start: int):
        """Yield (data, labels, real count) for batches ``start..`` of ``plan`` (a
        :class:`gpurec.order.Plan`)."""
        pipe = self.pipe
        pending: deque = deque()
        todo = iter(range(start, plan.batches))

        def submit_next() -> None:
            b = next(todo, None)
            if b is not None:
                pending.append((b, *self._submit(plan, b)))

        try:
            for _ in range(pipe.prefetch):
                submit_next()
            while pending:
                b, data, labels, futures = pending.popleft()
                submit_next()
                data, labels = self._collect(data, labels, futures, plan, b)
                if self.label_width == 1:
                    labels = labels[:, 0]
                self._handed.append(data)
                yield data, labels, plan.real[b]
                del data  # so that its buffer can be reused once the caller drops it
        finally:
            for _, _, _, futures in pending:
                for f in futures:
                    f.cancel()

    def state(self) -> dict:
        return {}  # batches follow from (seed, epoch, batch): nothing else to keep

    def restore(self, state: dict) -> None:
        pass

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._handed.clear()
        self._table.close()
