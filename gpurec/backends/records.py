"""What each record holds, learned the first time it is read: where its image bytes
lie in the memory-mapped shard, the image's decoded size, and its label.

A backend reads a record the first time through its own checks (the frames, the
IRHeader, the label against the dataset's width, the image's signature and size:
:func:`gpurec.recordio.unpack_view`, :func:`gpurec.transcode.sniff`), which cost
microseconds of Python per record. What those checks found does not change while the
shard is mapped, so a record that passed them is noted here (:meth:`RecordTable.learn`)
and read again from these arrays for a whole batch at once (:meth:`RecordTable.known`,
:meth:`RecordTable.payloads`): a gather of labels and sizes and one slice of the map per
image, no header parsed and no signature sniffed. A record that failed, or one whose
bytes are not the map's own (a record split into parts, an image converted before
feeding), is never noted and takes the checked path every time, so errors and skips
are exactly those of the checked path.

The arrays are indexed by sample and allocated zeroed (pages the kernel hands out as
they are first written): 21 bytes a sample with one label.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gpurec.dataset import Dataset

__all__ = ["RecordTable"]


class RecordTable:
    """Per-sample payload start (0: not learned), payload length, (width, height) and
    labels of ``dataset``'s samples, for the records whose image is the map's own bytes."""

    def __init__(self, dataset: Dataset, label_width: int) -> None:
        self.dataset = dataset
        n = len(dataset)
        self.start = np.zeros(n, np.int64)
        self.length = np.zeros(n, np.uint32)
        self.size = np.zeros((n, 2), np.uint16)
        self.label = np.zeros((n, label_width), np.float32)
        self.jpeg = np.zeros(n, bool)  # the image is a JPEG (the OpenCV backend asks)
        self._maps: list[np.ndarray | None] = [None] * len(dataset.shards)
        self._single = len(dataset.shards) == 1

    def shard_bytes(self, shard: int) -> np.ndarray | None:
        """The bytes of shard ``shard``'s memory map (which :attr:`start` indexes), or
        None (a shard still being fetched, an empty file)."""
        buf = self._maps[shard]
        if buf is None:
            view = self.dataset.shards[shard].reader.mapped()  # a fetched shard: once here
            if view is None:
                return None
            buf = self._maps[shard] = np.frombuffer(view, np.uint8)
        return buf

    def learn(self, index: int, payload, size, label, jpeg: bool = False) -> None:
        """Note that sample ``index`` passed the checks: its image is ``payload`` (which
        must be the record's own bytes), of ``size`` (width, height), labelled ``label``.
        Only an unsplit record in a local map is noted."""
        width, height = int(size[0]), int(size[1])
        if not (0 < width < 65536 and 0 < height < 65536):
            return
        shard, pos = self.dataset.locate(index)
        buf = self.shard_bytes(shard)
        if buf is None:
            return
        offset = int(self.dataset.shards[shard].offsets[pos])
        cflag, length = self.dataset.shards[shard].reader.frame_at(offset)
        start = offset + 8 + length - len(payload)
        if cflag != 0 or start < offset + 8 or start + len(payload) > len(buf):
            return
        self.length[index] = len(payload)
        self.size[index] = width, height
        self.label[index] = label
        self.jpeg[index] = jpeg
        self.start[index] = start  # last: another thread takes a record as learned by it

    def forget(self, index: int) -> None:
        """Take sample ``index`` back to the checked path (DALI could not decode it)."""
        self.start[index] = 0

    def known(self, indices: np.ndarray) -> np.ndarray:
        """Which of ``indices`` are learned (bool per position)."""
        return self.start[indices] != 0

    def shards(self, indices: np.ndarray) -> np.ndarray:
        """The shard each of ``indices`` lies in."""
        if self._single:
            return np.zeros(len(indices), np.intp)
        return np.searchsorted(self.dataset.starts, indices, side="right") - 1

    def payloads(self, indices: np.ndarray) -> list[np.ndarray]:
        """The image bytes of learned samples ``indices``: views of the maps, no copy."""
        start = self.start[indices]
        end = (start + self.length[indices]).tolist()
        start = start.tolist()
        if self._single:
            buf = self.shard_bytes(0)
            return [buf[a:b] for a, b in zip(start, end, strict=True)]
        shards = self.shards(indices).tolist()
        maps = self._maps
        return [maps[s][a:b] for s, a, b in zip(shards, start, end, strict=True)]

    def close(self) -> None:
        self._maps = [None] * len(self._maps)  # the maps can close once the views go
