"""``Pipeline(output="torch", label_dtype=...)``, ``batch[0]``/``batch[1]``, ``set_epoch``.

Real shards whose record k has label k and grey level 5k (tests.helpers.numbered_shards),
read by both CPU-side backends (OpenCV; DALI's CPU mode): the tensors must hold the very
pixels and labels the NumPy arrays hold, over the same memory.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from gpurec import Pipeline
from tests.helpers import numbered_shards

BACKENDS = ["cpu", "dali"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list:
    return numbered_shards(tmp_path_factory.mktemp("numbered"))  # 21 records


def _pipe(shards, backend: str, **kw) -> Pipeline:
    return Pipeline(shards, 4, (3, 8, 8), device="cpu", backend=backend, train=False, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_tensors_hold_the_numpy_batches(shards, backend: str) -> None:
    with _pipe(shards, backend) as plain, _pipe(shards, backend, output="torch") as torched:
        assert plain.output == "numpy" and torched.output == "torch"
        n = 0
        for want, got in zip(plain, torched, strict=True):
            data, label = got  # unpacking keeps working
            assert isinstance(data, torch.Tensor) and isinstance(label, torch.Tensor)
            assert data.dtype == torch.float32 and label.dtype == torch.float32
            assert data.device.type == "cpu" and tuple(data.shape) == (4, 3, 8, 8)
            np.testing.assert_array_equal(data.numpy(), want.data)
            np.testing.assert_array_equal(label.numpy(), want.label)
            assert got.index.tolist() == want.index.tolist()
            n += 1
        assert n == len(plain) == 5  # 21 records, batches of 4, the last dropped


def test_torch_tensor_is_the_batch_array_not_a_copy(shards) -> None:
    # zero-copy: the tensor's memory is the array the backend filled
    with _pipe(shards, "cpu", output="torch") as pipe:
        batch = next(iter(pipe))
        ptr = batch.data.data_ptr()
        # the very array the backend filled (it keeps those it handed out, to reuse them)
        assert ptr in {a.ctypes.data for a in pipe.backend._handed}
        # a batch still held is never reused for the next one
        second = next(iter(pipe))
        assert second.data.data_ptr() != ptr
        assert batch.label.tolist() == [0.0, 1.0, 2.0, 3.0]
        assert float(batch.data[1].mean()) == 5.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_labels_for_cross_entropy(shards, backend: str) -> None:
    with _pipe(shards, backend, output="torch", label_dtype="int64") as pipe:
        batches = list(pipe)
    labels = torch.cat([b.label for b in batches])
    assert labels.dtype == torch.int64 and labels.tolist() == list(range(20))
    loss = torch.nn.functional.cross_entropy(torch.zeros(4, 21), batches[0].label)
    assert loss.item() == pytest.approx(np.log(21), rel=1e-6)
    with _pipe(shards, backend, label_dtype="int64") as pipe:  # NumPy labels too
        batch = next(iter(pipe))
    assert batch.label.dtype == np.int64 and batch.label.tolist() == [0, 1, 2, 3]


def test_int64_refuses_fractional_labels(tmp_path) -> None:
    from tests.helpers import write_records

    rec = write_records(tmp_path / "f.rec", [np.zeros((8, 8, 3), np.uint8)] * 4,
                        [0.0, 1.5, 2.0, 3.0])  # fmt: skip
    pipe = Pipeline(rec, 4, (3, 8, 8), device="cpu", train=False, label_dtype="int64")
    with pipe, pytest.raises(ValueError, match=r"batch 0 of epoch 0 .*label 1\.5, not a whole"):
        next(iter(pipe))


def test_batch_indexes_as_a_pair(shards) -> None:
    with _pipe(shards, "cpu", output="torch") as pipe:
        batch = next(iter(pipe))
    assert batch[0] is batch.data and batch[1] is batch.label
    assert batch[-1] is batch.label and len(batch) == 2
    data, label = batch
    assert data is batch[0] and label is batch[1]
    with pytest.raises(IndexError):
        batch[2]
    # the habit of arcface_torch's DataLoaderX: move each item in place
    for k in range(len(batch)):
        batch[k] = batch[k].to(torch.float64)
    assert batch.data.dtype == torch.float64 and batch.label.dtype == torch.float64


def test_set_epoch_reads_the_epoch_named(shards) -> None:
    def epoch(pipe) -> list[int]:
        return [int(v) for b in pipe for v in b.label]

    with Pipeline(shards, 4, (3, 8, 8), device="cpu", shuffle=True, seed=3) as pipe:
        order = {e: epoch(pipe) for e in range(3)}  # epochs 0, 1, 2 in turn
    assert order[0] != order[1] != order[2]
    with Pipeline(shards, 4, (3, 8, 8), device="cpu", shuffle=True, seed=3) as pipe:
        for e in (2, 0, 1, 1):  # any order, and again
            pipe.set_epoch(e)
            assert epoch(pipe) == order[e]
        pipe.set_epoch(2)  # after an epoch left early, the epoch named starts afresh
        next(iter(pipe))
        pipe.set_epoch(2)
        assert epoch(pipe) == order[2]
        with pytest.raises(ValueError, match="epoch must be >= 0"):
            pipe.set_epoch(-1)


def test_set_epoch_keeps_a_checkpoints_resume(shards) -> None:
    with Pipeline(shards, 4, (3, 8, 8), device="cpu", shuffle=True, seed=3) as pipe:
        pipe.set_epoch(1)
        it = iter(pipe)
        first = [next(it).label.tolist() for _ in range(2)]
        state = pipe.state_dict()
        rest = [b.label.tolist() for b in it]
    with Pipeline(shards, 4, (3, 8, 8), device="cpu", shuffle=True, seed=3) as pipe:
        pipe.load_state_dict(state)
        pipe.set_epoch(1)  # the training loop starts again at the checkpoint's epoch
        assert [b.label.tolist() for b in pipe] == rest
        pipe.set_epoch(1)  # asked again: the whole epoch
        assert [b.label.tolist() for b in pipe][:2] == first


def test_output_checks(shards) -> None:
    with pytest.raises(ValueError, match="output must be one of"):
        _pipe(shards, "cpu", output="jax")
    with pytest.raises(ValueError, match="output='cupy' is GPU memory"):
        _pipe(shards, "cpu", output="cupy")
    with pytest.raises(ValueError, match="label_dtype must be one of"):
        _pipe(shards, "cpu", label_dtype="int32")
    with pytest.raises(ValueError, match="output='numpy' is host memory"):
        Pipeline(shards, 4, device="gpu", output="numpy")


def test_torch_output_on_the_cpu_needs_no_cupy(shards, tmp_path) -> None:
    # A CPU-only PyTorch user has no CuPy: a torch loop must not import it.
    code = (
        "import sys; sys.modules['cupy'] = None\n"  # importing CuPy now raises
        "import gpurec\n"
        f"pipe = gpurec.Pipeline({[str(s) for s in shards]!r}, 4, (3, 8, 8), device='cpu',"
        " output='torch', label_dtype='int64')\n"
        "x, y = next(iter(pipe))\n"
        "print(type(x).__module__, x.dtype, y.dtype, 'nvidia.dali' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch", "torch.float32", "torch.int64", "False"]


@pytest.mark.parametrize("imglist", [False, True])
def test_image_record_iter_hands_torch_tensors(golden, imglist: bool) -> None:
    import gpurec.mxnet as mx

    kw = dict(path_imgrec=str(golden / "resized.rec"), data_shape=(3, 32, 32), resize=40,
              batch_size=4, shuffle=False, round_batch=False, ctx=mx.cpu())  # fmt: skip
    if imglist:  # labels from the .lst (MXNet's path_imglist): relabelled beside the images
        kw["path_imglist"] = str(golden / "resized.lst")
    plain = mx.io.ImageRecordIter(**kw)
    torched = mx.io.ImageRecordIter.with_pipeline_options(
        {"output": "torch", "label_dtype": "int64"}, **kw
    )
    n = 0
    for want, got in zip(plain, torched, strict=True):
        data, label = got.data[0], got.label[0]
        assert isinstance(data, torch.Tensor) and label.dtype == torch.int64
        np.testing.assert_array_equal(data.numpy(), want.data[0].asnumpy())
        assert label.tolist() == want.label[0].asnumpy().astype(np.int64).tolist()
        n += 1
    assert n == 3
    plain.close()
    torched.close()


def test_image_record_iter_relabelled_int64_labels_without_torch(golden) -> None:
    # labels from the .lst (path_imglist) follow label_dtype on NumPy output too
    import gpurec.mxnet as mx

    kw = dict(path_imgrec=str(golden / "resized.rec"), path_imglist=str(golden / "resized.lst"),
              data_shape=(3, 32, 32), resize=40, batch_size=4, shuffle=False,
              round_batch=False, ctx=mx.cpu())  # fmt: skip
    plain = mx.io.ImageRecordIter(**kw)
    ints = mx.io.ImageRecordIter.with_pipeline_options({"label_dtype": "int64"}, **kw)
    for want, got in zip(plain, ints, strict=True):
        label = got.label[0].asnumpy()
        assert label.dtype == np.int64
        assert label.tolist() == want.label[0].asnumpy().astype(np.int64).tolist()
    plain.close()
    ints.close()
