"""The sample format inside every shard: image shards from `pagoda prepare` and latent-pair shards from precompute.

A shard is a plain POSIX (ustar) tar, readable by `webdataset` and `tar`, named `{split}-{NNNNNN}.tar`
(`train-000000.tar`, `val-000003.tar`). A sample is the run of consecutive members sharing one key, the
WebDataset convention: the key is the member name up to its first dot, the rest is the member's type.

Keys are the input's position within its split, nine digits: `000012345` (a skipped input leaves its key unused). They never contain a dot, are unique in
a split, and survive precompute unchanged (pair `train-000007.tar` holds the same keys, in the same order, as
image shard `train-000007.tar`), so any latent can be traced to its image and source.

Members of a sample (all optional except the image):

| member              | content                                                                  |
|---------------------|--------------------------------------------------------------------------|
| `KEY.png` / `.jpg`  | the image at the dataset's full resolution, 8-bit grey (L) or RGB        |
| `KEY.cls`           | class id, ASCII decimal (`"7"`); names in the manifest's `class_names`   |
| `KEY.txt`           | caption, UTF-8                                                           |
| `KEY.json`          | metadata: `{"source": "<input file or builtin item>", ...}`             |
| `KEY.latent.npy`    | latent-pair shards: DDIM-inversion latent, float16/float32, (C, r, r)    |
| `KEY.latent_flip.npy` | optional: latent of the horizontally flipped image                     |
| `KEY.emb.npy`       | optional: pooled CLIP text embedding, (D,)                               |
| `KEY.tok.npy`       | optional: per-token CLIP text embedding, (T, D)                          |
| `KEY.mask.npy`      | optional: bool (T,), True for real tokens (absent: all tokens real)      |

Arrays are `.npy` (numpy's format, read with allow_pickle=False); any further `NAME.npy` member is carried
through as `Sample.arrays[NAME]`. Members are written in the order above, so a sample is one contiguous byte
range of its tar; `shards.ShardWriter` records those ranges in a small index beside each shard
(`train-000007.idx.json`) so a reader can fetch any sample, or run of samples, with one range request.

Writers and readers use only `Sample`, `sample_to_members` and `sample_from_members` below.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IMAGE_EXTS = ("png", "jpg")
KEY_DIGITS = 9
_KEY_RE = re.compile(r"^[0-9A-Za-z_-]+$")
# Member order inside a sample: image first, then metadata, then arrays (see the table above).
_ARRAY_ORDER = ("latent", "latent_flip", "emb", "tok", "mask")


class CorruptSample(ValueError):
    """A sample's members are missing, undecodable or inconsistent."""


def make_key(index: int) -> str:
    """The key of the `index`-th sample of a split."""
    return f"{index:0{KEY_DIGITS}d}"


@dataclass
class Sample:
    """One sample as stored: the encoded image plus its condition, metadata and arrays (latents, embeddings)."""

    key: str
    image: bytes                      # encoded PNG or JPEG bytes, exactly as stored
    image_ext: str = "png"            # "png" or "jpg"
    cls: int | None = None            # class id, or None for unlabelled data
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def sample_to_members(sample: Sample) -> list[tuple[str, bytes]]:
    """The tar members (name, bytes) of `sample`, in the canonical order."""
    if not _KEY_RE.match(sample.key):
        raise ValueError(f"sample key {sample.key!r} must be letters, digits, '_' or '-' (no dots or slashes)")
    if sample.image_ext not in IMAGE_EXTS:
        raise ValueError(f"sample {sample.key}: image_ext must be one of {IMAGE_EXTS}, got {sample.image_ext!r}")
    members = [(f"{sample.key}.{sample.image_ext}", sample.image)]
    if sample.cls is not None:
        members.append((f"{sample.key}.cls", str(int(sample.cls)).encode()))
    if sample.caption is not None:
        members.append((f"{sample.key}.txt", sample.caption.encode("utf-8")))
    if sample.meta:
        members.append((f"{sample.key}.json", json.dumps(sample.meta, sort_keys=True).encode()))
    names = sorted(sample.arrays, key=lambda n: (_ARRAY_ORDER.index(n) if n in _ARRAY_ORDER else len(_ARRAY_ORDER), n))
    for name in names:
        if not re.match(r"^[a-z0-9_]+$", name):
            raise ValueError(f"sample {sample.key}: array name {name!r} must be lower-case letters, digits or '_'")
        members.append((f"{sample.key}.{name}.npy", _npy_bytes(sample.arrays[name])))
    return members


def sample_from_members(members: list[tuple[str, bytes]]) -> Sample:
    """Rebuilds a Sample from the tar members of one sample; raises CorruptSample when they do not form one."""
    if not members:
        raise CorruptSample("empty sample")
    key = members[0][0].split(".", 1)[0]
    sample = Sample(key=key, image=b"", image_ext="")
    for name, data in members:
        member_key, _, ext = name.partition(".")
        if member_key != key or not ext:
            raise CorruptSample(f"member {name!r} does not belong to sample {key!r}")
        try:
            if ext in IMAGE_EXTS:
                sample.image, sample.image_ext = data, ext
            elif ext == "cls":
                sample.cls = int(data.decode("ascii"))
            elif ext == "txt":
                sample.caption = data.decode("utf-8")
            elif ext == "json":
                sample.meta = json.loads(data)
            elif ext.endswith(".npy"):
                sample.arrays[ext[: -len(".npy")]] = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, UnicodeDecodeError, OSError, EOFError) as err:
            raise CorruptSample(f"sample {key}: member {name!r} is unreadable ({err})") from None
    if not sample.image:
        raise CorruptSample(f"sample {key}: no .png or .jpg member")
    return sample


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()
