"""gpurec.mxnet.io.ImageRecordIter against MXNet 1.9.1's own outputs, on both backends.

The references in ``tests/data/mxnet_iter/`` were written by real MXNet 1.9.1
(``benchmarks/make_mxnet_iter_reference.py``, its README gives every call). The same
keyword sets run here through ``gpurec.mxnet`` on the OpenCV and the DALI backend:

- deterministic configurations are compared pixel for pixel;
- random geometry (rotation, shear, scale, aspect stretch, crops, padding, mirror) is
  compared by distribution: every output of a coordinate image (R = x, G = y) is turned
  into the affine map it applied (``mxnet_geometry.estimate``), and the distributions of
  its parameters over 320 outputs are compared with MXNet's by a two-sample
  Kolmogorov-Smirnov statistic;
- random colour is compared by the distribution of per-image statistics, as the change
  from the same image's un-augmented statistics.

The draws are seeded, so these tests are deterministic: a failure is a change of
meaning, not bad luck.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mxnet_geometry import (
    COLOUR_COMMON,
    COLOUR_CONFIGS,
    GEOM_COMMON,
    GEOM_CONFIGS,
    colour_stats,
    estimate,
)

import gpurec.mxnet as mx
from gpurec.mxnet.keywords import BACKEND_ENV

DATA = Path(__file__).parent / "data" / "mxnet_iter"
BASE = dict(preprocess_threads=1, shuffle=False, verbose=False)
BACKENDS = ["cpu", "dali"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv(BACKEND_ENV, request.param)
    return request.param


def outputs(rec: str, epochs: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(data, labels) of the real rows of ``epochs`` epochs, as MXNet's generator read them."""
    it = mx.io.ImageRecordIter(
        path_imgrec=str(DATA / f"{rec}.rec"), path_imgidx=str(DATA / f"{rec}.idx"), **{**BASE, **kw}
    )
    data, labels = [], []
    for _ in range(epochs):
        for batch in it:
            n = batch.data[0].shape[0] - batch.pad
            data.append(batch.data[0].asnumpy()[:n])
            labels.append(batch.label[0].asnumpy().reshape(n + batch.pad, -1)[:n, 0])
        it.reset()
    return np.concatenate(data), np.concatenate(labels)


def ks(a: np.ndarray, b: np.ndarray, slack: float = 0.0) -> float:
    """Two-sample Kolmogorov-Smirnov statistic, blind to shifts up to ``slack``: the
    largest amount by which one empirical CDF exceeds the other moved by ``slack``
    (``slack=0``: the plain statistic). Estimates carry fitting and rounding noise (a
    0.5 rounded up by OpenCV and to even by DALI moves a coordinate by a pixel), which
    must not count; a change of range, sign or rule moves the CDFs by far more."""
    a, b = np.sort(a[np.isfinite(a)]), np.sort(b[np.isfinite(b)])
    grid = np.concatenate([a, b, a + slack, b + slack])

    def cdf(x: np.ndarray, at: np.ndarray) -> np.ndarray:
        return np.searchsorted(x, at, "right") / len(x)

    return float(
        max(
            np.max(cdf(a, grid - slack) - cdf(b, grid)),
            np.max(cdf(b, grid - slack) - cdf(a, grid)),
            0.0,
        )
    )


# The largest KS statistic accepted: the 0.1 % critical value for two samples of ~320 is
# 1.95 * sqrt(2 / 320) = 0.154; a change of meaning (a wrong range, sign or rule) moves
# these distributions far more.
KS_LIMIT = 0.16


def _same_distribution(name: str, ours: np.ndarray, ref: np.ndarray, atol: float) -> str | None:
    """None when ``ours`` and ``ref`` agree; else what differs. A parameter MXNet holds
    constant (spread below ``atol``) is compared by value, not by KS (its estimates are
    noise)."""
    ref_f, ours_f = ref[np.isfinite(ref)], ours[np.isfinite(ours)]
    if np.percentile(ref_f, 99) - np.percentile(ref_f, 1) < atol:
        gap = abs(float(np.median(ours_f)) - float(np.median(ref_f)))
        spread = np.percentile(ours_f, 99) - np.percentile(ours_f, 1)
        if gap > atol or spread > 2 * atol:
            held, got = np.median(ref_f), np.median(ours_f)
            return f"{name}: MXNet holds it at {held:.4g}, ours {got:.4g} (spread {spread:.3g})"
        return None
    d = ks(ours_f, ref_f, slack=atol)
    if d > KS_LIMIT:
        q = [5, 25, 50, 75, 95]
        return (
            f"{name}: KS {d:.3f}; quantiles {q}: ours {np.round(np.percentile(ours_f, q), 3)}"
            f" MXNet {np.round(np.percentile(ref_f, q), 3)}"
        )
    return None


# How far apart two values must be to count as different (degrees; shear; source pixels
# per output pixel; source pixels for the centre; a fraction of the output).
TOLERANCE = {"angle": 0.5, "shear": 0.02, "scale_x": 0.03, "scale_y": 0.03, "center_x": 1.5,
             "center_y": 1.5, "inside": 0.01}  # fmt: skip


@pytest.mark.parametrize("name", sorted(GEOM_CONFIGS))
def test_random_geometry_has_mxnets_distribution(name: str, backend: str) -> None:
    ref = np.load(DATA / f"geom_{name}.npz")
    kw = dict(GEOM_COMMON, **GEOM_CONFIGS[name])
    data, _ = outputs("coord", 5, **kw)
    rows = [estimate(img.transpose(1, 2, 0), 255) for img in data]
    assert len(rows) == len(ref["angle"]) == 320
    problems = [
        _same_distribution(
            key, np.array([r[key] for r in rows], float), ref[key].astype(float), atol
        )
        for key, atol in TOLERANCE.items()
    ]
    mirrored = np.mean([r["mirrored"] for r in rows])
    if abs(mirrored - ref["mirrored"].mean()) > 0.1:
        problems.append(f"mirrored: ours {mirrored:.2f}, MXNet {ref['mirrored'].mean():.2f}")
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)


def _stats(data: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    rows = [colour_stats(img.transpose(1, 2, 0)) for img in data]
    out = {"record": labels.astype(int)}
    for key in ("mean", "std", "sat", "luma"):
        out[key] = np.array([r[key] for r in rows], np.float64)
    return out


@pytest.mark.parametrize("name", sorted(set(COLOUR_CONFIGS) - {"baseline"}))
def test_random_colour_has_mxnets_distribution(name: str, backend: str) -> None:
    kw = dict(COLOUR_COMMON)
    base = _stats(*outputs("natural", 1, **kw))
    ours = _stats(*outputs("natural", 25, **kw, **COLOUR_CONFIGS[name]))
    ref, ref_base = np.load(DATA / f"colour_{name}.npz"), np.load(DATA / "colour_baseline.npz")
    base_by_record = {int(r): k for k, r in enumerate(base["record"])}
    ref_base_by_record = {int(r): k for k, r in enumerate(ref_base["record"])}
    problems = []
    for key, atol in (("mean", 0.5), ("std", 0.5), ("sat", 0.5), ("luma", 0.5)):
        mine = ours[key] - base[key][[base_by_record[r] for r in ours["record"]]]
        theirs = ref[key] - ref_base[key][[ref_base_by_record[int(r)] for r in ref["record"]]]
        if mine.ndim == 2:
            for c, channel in enumerate("RGB"):
                problems.append(
                    _same_distribution(f"{key} {channel}", mine[:, c], theirs[:, c], atol)
                )
        else:
            problems.append(_same_distribution(key, mine, theirs, atol))
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)
