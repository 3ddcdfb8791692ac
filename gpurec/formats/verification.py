"""InsightFace verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``...): a
pickle of ``(images, issame)``, ``images`` the encoded bytes of ``2 * len(issame)``
images, image ``2k`` and ``2k + 1`` forming pair ``k``.

The pickle is read with an unpickler that builds only lists, tuples, bytes, bools,
numbers and NumPy arrays (some sets hold the images as uint8 arrays): a ``.bin`` from
the internet cannot run code on load. Exporting writes ``DEST/images/NNNNN.jpg`` (bytes
unchanged, extension sniffed) and ``DEST/pairs.tsv`` (``first<TAB>second<TAB>same``).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

from gpurec.formats import extension

__all__ = ["VerificationSet", "read_bin"]

_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("builtins", "bytearray"), ("builtins", "bool"),
    ("__builtin__", "bytearray"), ("__builtin__", "bool"), ("_codecs", "encode"),
}  # fmt: skip


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"refused: the pickle asks for {module}.{name}, which a verification set "
                "does not hold (only lists of image bytes and bools are read)"
            )
        return super().find_class(module, name)


@dataclass
class VerificationSet:
    """The images (encoded bytes, as stored) and the pairs' same/different flags."""

    path: str  # as given: a local path or a URL
    images: list[bytes]
    issame: list[bool]

    @property
    def pairs(self) -> int:
        return len(self.issame)

    def summary(self) -> dict:
        formats: dict[str, int] = {}
        for data in self.images:
            try:
                ext = extension(data)
            except Exception:
                ext = "unknown"
            formats[ext] = formats.get(ext, 0) + 1
        same = sum(self.issame)
        return {"path": str(self.path), "pairs": self.pairs, "same": same,
                "different": self.pairs - same, "images": len(self.images),
                "formats": formats}  # fmt: skip


def _as_bytes(item, i: int, path: str) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    dtype = getattr(item, "dtype", None)  # a uint8 NumPy array of the encoded image
    if dtype is not None and dtype.itemsize == 1 and hasattr(item, "tobytes"):
        return item.tobytes()
    raise ValueError(f"{path}: image {i} is a {type(item).__name__}, not encoded image bytes")


def read_bin(path: str | Path, storage_options: dict | None = None) -> VerificationSet:
    """Read a verification ``.bin``, a local path or a URL (``s3://...``: the file is
    read whole, a few hundred MB at most); ValueError naming the file for anything
    else."""
    from gpurec.storage import filesystem, is_url, local_path

    text = str(path)
    try:
        if is_url(text) and not text.startswith("file://"):
            fs, where = filesystem(text, storage_options)
            f = io.BytesIO(fs.cat_file(where))
        else:
            f = open(local_path(text), "rb")  # noqa: SIM115 - closed below
        with f:
            data = _Unpickler(io.BufferedReader(f), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as exc:
        raise ValueError(f"{text}: not an InsightFace verification set: {exc}") from None
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ValueError(f"{text}: not an InsightFace verification set: expected a pickled "
                         f"(images, issame) pair, got {type(data).__name__}")  # fmt: skip
    bins, issame = data
    bins, issame = list(bins), [bool(x) for x in issame]
    if len(bins) != 2 * len(issame):
        raise ValueError(
            f"{text}: {len(bins)} images for {len(issame)} pairs (a pair is two images)"
        )
    return VerificationSet(text, [_as_bytes(b, i, text) for i, b in enumerate(bins)], issame)
