"""Damage committed shards the way a bad disk or a broken upload would, for the corrupt-data tests."""
from __future__ import annotations

import os
from pathlib import Path

from pagoda_dist.data.shards import parse_members, read_index


def garble_image(shard: Path, sample: int) -> str:
    """Overwrites 200 bytes of sample number `sample`'s image with noise (the tar stays intact); returns the
    sample's reference as the reader reports it."""
    index = read_index(str(shard))
    raw = bytearray(shard.read_bytes())
    lo = int(index.offsets[sample])
    members = parse_members(bytes(raw[lo:int(index.offsets[sample + 1])]))
    image_at = lo + 512 + raw[lo + 512:].find(members[0][1][:16])
    raw[image_at:image_at + 200] = os.urandom(200)
    shard.write_bytes(bytes(raw))
    return f"{shard.name}/{index.key(sample)}"


def break_header(shard: Path, sample: int) -> str:
    """Flips a byte of sample number `sample`'s first tar header (its checksum no longer matches)."""
    index = read_index(str(shard))
    raw = bytearray(shard.read_bytes())
    raw[int(index.offsets[sample]) + 5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    return f"{shard.name}/{index.key(sample)}"
