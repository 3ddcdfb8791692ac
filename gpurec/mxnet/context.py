"""``mx.cpu()`` and ``mx.gpu(i)``: MXNet's devices, as far as gpurec's MXNet skin uses them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Context", "cpu", "gpu"]


@dataclass(frozen=True)
class Context:
    """``mx.cpu()`` / ``mx.gpu(i)``: where :class:`ImageRecordIter` puts its arrays when
    given as ``ctx`` (MXNet's own ``ctx`` strings keep the arrays on the host)."""

    device_type: str
    device_id: int = 0

    def __str__(self) -> str:
        return f"{self.device_type}({self.device_id})"


def cpu(device_id: int = 0) -> Context:
    return Context("cpu", device_id)


def gpu(device_id: int = 0) -> Context:
    return Context("gpu", device_id)
