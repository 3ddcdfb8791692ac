"""Opening a dataset of many shards in a bucket: seconds to a ready ``Pipeline``.

    .venv/bin/python benchmarks/bench_remote_open.py --shards 400 --rounds 3

Writes ``--shards`` small shards (``--records`` records each) to a moto S3 server on
127.0.0.1 (a real S3 API; each request costs moto a few ms, a real bucket 10-50 ms),
then times ``gpurec.Pipeline("s3://bucket/ds/ds")`` from an empty shard cache, each round in
a fresh cache, and counts the requests the server saw. A Pipeline on a URL reads every
shard's `.idx` (and a few record headers) before its first batch; the `.rec` files come
later, in the background (docs/training-from-s3.md). ``--added-latency`` adds that many
ms to every request the server answers, to stand in for a real bucket's latency.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

# The S3 server, in a process of its own (as a bucket is): moto on 127.0.0.1, each request
# delayed by argv[1] ms (a bucket's latency) and counted; GET /__requests says how many.
SERVER = """
import logging, sys, threading, time
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
delay, count, lock = float(sys.argv[1]) / 1000, [0], threading.Lock()
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
inner = server._server.app
def app(environ, start_response):
    if environ.get("PATH_INFO") == "/__requests":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(count[0]).encode()]
    with lock:
        count[0] += 1
    time.sleep(delay)
    return inner(environ, start_response)
server._server.app = app
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
threading.Event().wait()
"""


def make_shards(folder: Path, shards: int, records: int) -> None:
    from gpurec.recordio import IRHeader, RecordWriter, pack

    png = cv2.imencode(".png", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()
    for s in range(shards):
        rec = folder / f"ds-{s:05d}-of-{shards:05d}.rec"
        with RecordWriter(rec, rec.with_suffix(".idx")) as writer:
            for r in range(records):
                key = s * records + r
                writer.write(pack(IRHeader(0, float(r % 10), key, 0), png), key=key)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=400)
    p.add_argument("--records", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--added-latency", type=float, default=0.0, help="ms per request")
    a = p.parse_args()

    import boto3

    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(a.added_latency)], stdout=subprocess.PIPE, text=True
    )
    endpoint = server.stdout.readline().strip()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1",
    )  # fmt: skip

    def requests() -> int:
        with urllib.request.urlopen(endpoint + "/__requests") as answer:
            return int(answer.read())

    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    work = Path(tempfile.mkdtemp(prefix="gpurec-remote-open-"))
    try:
        make_shards(work, a.shards, a.records)
        for path in sorted(work.iterdir()):
            client.put_object(Bucket="bench", Key=f"ds/{path.name}", Body=path.read_bytes())
        import gpurec

        times, counts, cpu = [], [], []
        for r in range(a.rounds):
            cache = work / f"cache-{r}"
            before = requests()
            t0, c0 = time.perf_counter(), time.process_time()
            pipe = gpurec.Pipeline("s3://bench/ds/ds", 4, (3, 8, 8), device="cpu", backend="cpu",
                                   cache_dir=cache)  # fmt: skip
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            counts.append(requests() - before)
            assert len(pipe.dataset) == a.shards * a.records
            pipe.close()
            print(f"round {r + 1}: {times[-1]:.2f} s ({cpu[-1]:.2f} s CPU here), "
                  f"{counts[-1]} requests", flush=True)  # fmt: skip
        print(
            f"{a.shards} shards of {a.records} records, +{a.added_latency:g} ms a request: "
            f"{statistics.median(times):.2f} s to a Pipeline (median of {a.rounds}; "
            f"{statistics.median(cpu):.2f} s CPU in this process), "
            f"{statistics.median(counts):.0f} requests"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
