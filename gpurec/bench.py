"""``gpurec bench``: how fast a dataset loads here, stage by stage.

Measures, on the user's own shards and in one run: reading the records (the storage
and memory-map limit), decoding them with OpenCV on all cores (the decode limit of the
CPU), and the full Pipeline per epoch (read, decode, augment, batch, hand-off). The
ratios between the three say where the time goes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np

from gpurec.dataset import Dataset, resolve_source
from gpurec.pipeline import Pipeline
from gpurec.recordio import unpack

__all__ = ["BenchResult", "bench"]


@dataclass
class BenchResult:
    records: int
    read_per_s: float
    read_mb_per_s: float
    decode_per_s: float
    epochs: list[float] = field(default_factory=list)  # images/s of each Pipeline epoch
    backend: str = ""
    device: str = ""
    startup_s: float = 0.0

    @property
    def pipeline_per_s(self) -> float:
        """Steady-state images/s: the median epoch after the first (the first warms up)."""
        steady = self.epochs[1:] or self.epochs
        return float(np.median(steady)) if steady else 0.0


def bench(
    source,
    *,
    device: str = "cpu",
    backend: str = "auto",
    epochs: int = 3,
    batch_size: int = 64,
    data_shape: tuple[int, int, int] = (3, 224, 224),
    limit: int = 2000,
    progress: Callable[[int], None] | None = None,
    **pipeline_options,
) -> BenchResult:
    """Time reading and decoding ``limit`` records, then ``epochs`` Pipeline epochs."""
    dataset = Dataset(resolve_source(source))
    n = min(limit, len(dataset))
    start = time.perf_counter()
    payloads = [unpack(dataset.read(i))[1] for i in range(n)]
    read_s = time.perf_counter() - start
    size = sum(len(p) for p in payloads)
    dataset.close()

    def decode(payload: bytes) -> None:
        cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)

    threads = os.cpu_count() or 1
    cv2.setNumThreads(1)
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(decode, payloads))
        decode_s = time.perf_counter() - start
    del payloads

    def make() -> Pipeline:
        return Pipeline(source, batch_size, data_shape, device=device, backend=backend,
                        **pipeline_options)  # fmt: skip

    start = time.perf_counter()
    with make() as probe:  # construction to first batch
        next(iter(probe))
        name = type(probe.backend).__name__
    result = BenchResult(
        records=n,
        read_per_s=n / read_s,
        read_mb_per_s=size / read_s / 1e6,
        decode_per_s=n / decode_s,
        backend=name,
        device=device,
        startup_s=time.perf_counter() - start,
    )
    with make() as pipe:
        for _ in range(epochs):
            seen, start = 0, time.perf_counter()
            for batch in pipe:
                seen += len(batch.label)
                if progress is not None:
                    progress(len(batch.label))
            if device == "gpu":
                import cupy

                cupy.cuda.Device().synchronize()
            result.epochs.append(seen / (time.perf_counter() - start))
    return result
