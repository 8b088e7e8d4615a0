"""What several benchmarks share: a command line that starts like `pagoda run`'s, and a fresh embedded S3 server to
measure against."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from pagoda_dist import storage


def config_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser taking a config file and its dotted overrides, as `pagoda run` does; the
    benchmark adds its own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. run.name=tiles-v9")
    return parser


def embedded_s3(folder: Path, bucket: str = "bench") -> tuple[storage.LocalS3Server, str]:
    """Starts an embedded S3 server with its data in `folder`, points this process (and the processes it starts:
    Ray workers) at it, and creates `bucket`; returns the server and the bucket's URL. Stop it with
    `server.stop()` after `storage.configure()`."""
    server = storage.LocalS3Server(folder, port=storage.free_port_block(), startup_timeout_s=60)
    server.start()
    try:
        os.environ.update(server.env())
        storage.configure(endpoint_url=server.endpoint, region=server.region)
        return server, server.ensure_bucket(bucket)
    except BaseException:
        server.stop()
        raise
