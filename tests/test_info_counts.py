"""`gpurec info --json`'s ``num_classes`` and ``num_image``: what arcface_torch's configs
(``config.num_classes``, ``config.num_image``) take, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import color_tree, run_gpurec, write_records

from gpurec.pack import pack


def info(path: Path) -> dict:
    res = run_gpurec("info", path, "--json", "--sample", "0")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_insightface_file_counts_identities_and_images(golden: Path) -> None:
    got = info(golden / "insightface" / "train.rec")
    # 12 images of 3 identities; header and identity records are neither
    assert (got["num_classes"], got["num_image"]) == (3, 12)


def test_a_pack_counts_its_class_names(tmp_path: Path) -> None:
    pack(color_tree(tmp_path / "img", per_class=3), tmp_path / "out" / "ds", resize=32, workers=1)
    got = info(tmp_path / "out" / "ds")
    assert got["classes"] == ["a", "b", "c"]
    assert (got["num_classes"], got["num_image"]) == (3, 9)


def test_without_names_the_largest_label_sets_the_width(tmp_path: Path) -> None:
    import numpy as np

    images = [np.full((8, 8, 3), 10 * k, np.uint8) for k in range(3)]
    write_records(tmp_path / "r.rec", images, [0.0, 4.0, 4.0])  # labels 1-3 unused here
    assert (info(tmp_path / "r.rec")["num_classes"], info(tmp_path / "r.rec")["num_image"]) == (
        5, 3)  # fmt: skip
    write_records(tmp_path / "f.rec", images, [0.0, 0.5, 1.0])  # not class numbers
    assert info(tmp_path / "f.rec")["num_classes"] is None


def test_labels_that_are_not_class_numbers_have_no_class_count(golden: Path) -> None:
    got = info(golden / "special.rec")  # multi-label records
    assert (got["num_classes"], got["num_image"]) == (None, 6)


# ------------------------------------- class names of im2rec packs, from their .lst


def test_im2rec_pack_names_its_classes_from_the_lst(golden: Path, tmp_path: Path) -> None:
    import shutil

    import numpy as np

    from gpurec.grid import captions
    from gpurec.inspection import find_classes
    from gpurec.torch import RecordDataset

    for name in ("resized.rec", "resized.idx", "resized.lst"):  # as MXNet's im2rec wrote them
        shutil.copy(golden / name, tmp_path / name)
    rec = tmp_path / "resized.rec"
    assert find_classes(rec) == ["cat", "dog", "fox"]  # cat/cat_0.jpg has label 0, ...
    # what `gpurec show` captions a batch with
    shown = captions(np.array([2.0, 0.0, 1.0], np.float32), find_classes(rec))
    assert shown == ["fox", "cat", "dog"]
    got = info(rec)
    assert got["classes"] == ["cat", "dog", "fox"] and got["num_classes"] == 3
    assert got["labels"] == {"cat": 4, "dog": 4, "fox": 4}
    assert RecordDataset(rec).classes == ["cat", "dog", "fox"]
    lst = (tmp_path / "resized.lst").read_text()
    for broken in (
        lst.replace("cat/cat_1.jpg", "dog/cat_1.jpg"),  # one folder under two labels
        lst.replace("cat/cat_1.jpg", "cat_1.jpg"),  # a path in no folder
        "".join(line for line in lst.splitlines(True) if "\t1.000000\t" not in line),  # gap
    ):
        (tmp_path / "resized.lst").write_text(broken)
        assert find_classes(rec) is None, broken
    (tmp_path / "resized.lst").unlink()
    assert find_classes(rec) is None
