"""Images/s streamed from img2dataset-style WebDataset shards indexed in place vs our own shards of the same images.

    python benchmarks/wds_stream.py                        # photo tiles at 64 px, streamed at 32 and 64 px
    python benchmarks/wds_stream.py --workers 2 --batch 64 --repeats 3

Prepares builtin:photo-tiles once at 64 px as JPEG (`pagoda prepare`), then writes the very same JPEG bytes in
img2dataset's layout (`NNNNN.tar` of KEY.jpg + KEY.txt + KEY.json, by the `webdataset` package's TarWriter, as
many samples per tar as our shards hold), uploads both to a fresh bucket of an embedded SeaweedFS server
(127.0.0.1, stopped at the end), indexes the img2dataset tars in place (`wds_source.index_webdataset`, timed),
and streams both with `StreamingReader`, alternating, printing images/s side by side with the ratio
img2dataset / ours (goal: ~1: the same range reads, the same decoding). CPU time per image (this process, its
DataLoader workers and the S3 server) is printed too: on a busy shared machine it is the steadier comparison.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import embedded_s3
from benchmarks.data_stream import best_of


def write_img2dataset(ours: str, out: Path) -> int:
    """Our train shards' samples, same JPEG bytes and captions, as img2dataset tars (one per shard of ours)."""
    import webdataset as wds

    from pagoda_dist import storage
    from pagoda_dist.data.manifest import read_manifest
    from pagoda_dist.data.shards import iter_shard

    out.mkdir(parents=True)
    count = 0
    for s, info in enumerate(read_manifest(ours).shards("train")):
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as tar:
            for i, sample in enumerate(iter_shard(storage.join(ours, info.name))):
                key = f"{s:05d}{i:04d}"
                caption = f"a photo tile from {sample.meta.get('source', 'a photograph')}"
                tar.write({"__key__": key, "jpg": sample.image, "txt": caption,
                           "json": {"key": key, "caption": caption, "status": "success", "width": 64, "height": 64}})
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs timed per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per cell (best kept)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many tiles")
    parser.add_argument("--window", type=int, default=1024, help="shuffle window (data.shuffle_buffer)")
    args = parser.parse_args()

    from pagoda_dist import storage
    from pagoda_dist.data.prepare import prepare
    from pagoda_dist.data.wds_source import index_webdataset

    with tempfile.TemporaryDirectory(prefix="pagoda-bench-") as tmp:
        ours_local = str(Path(tmp) / "ours")
        prepare("builtin:photo-tiles", ours_local, resolution=64, image_format="jpeg", shard_size=500,
                val_fraction=0.0, workers=2, limit=args.limit, progress=False)
        count = write_img2dataset(ours_local, Path(tmp) / "img2dataset")
        server, bucket = embedded_s3(Path(tmp) / "s3")
        try:
            ours, tars, index = (storage.join(bucket, name) for name in ("ours", "img2dataset", "index"))
            storage.upload_dir(ours_local, ours)
            storage.upload_dir(str(Path(tmp) / "img2dataset"), tars)
            start = time.perf_counter()
            report = index_webdataset(tars, index, val_fraction=0.0, progress=False)
            scan_s = time.perf_counter() - start
            print(f"dataset: {count} photo tiles at 64 px (the same JPEG bytes in both layouts), "
                  f"{report.shards} shards each\nindex of the img2dataset tars on S3: {scan_s:.2f} s "
                  f"({count / scan_s:.0f} samples/s, read once)")
            print(f"S3: {server.endpoint}; batch {args.batch}, {args.workers} DataLoader workers, shuffle window "
                  f"{args.window}, {args.epochs} epoch(s) per measurement, best of {args.repeats}\n")
            print(f"{'res':>5} {'ours img/s':>11} {'img2dataset img/s':>18} {'ratio':>6}   "
                  f"{'ours CPU ms/img':>15} {'img2dataset CPU ms/img':>22} {'CPU ratio':>9}")
            pid = server.status().pid
            for res in args.resolutions:
                rates, cpu = best_of({"ours": (ours, pid), "wds": (index, pid)}, res, args)
                print(f"{res:>5} {rates['ours']:>11.0f} {rates['wds']:>18.0f} {rates['wds'] / rates['ours']:>6.2f}   "
                      f"{cpu['ours']:>15.3f} {cpu['wds']:>22.3f} {cpu['ours'] / cpu['wds']:>9.2f}", flush=True)
        finally:
            storage.configure()
            server.stop()


if __name__ == "__main__":
    main()
