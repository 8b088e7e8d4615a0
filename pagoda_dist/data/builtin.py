"""Two real datasets that install offline, used by `prepare("builtin:NAME", ...)`.

builtin:photo-tiles (unconditional, colour)
    Square tiles cut from real photographs that ship inside installed packages: scikit-image's bundled photos
    (only files inside the wheel, read by path, so nothing is ever fetched), scikit-learn's sample images (china,
    flower), and Debian's mate-backgrounds nature photos (/usr/share/backgrounds/mate/nature, 12 photos up to
    2560x1920) when installed. The abstract/desktop wallpapers of that package are illustrations, not photos,
    and are left out. Tiles are max(64, resolution) px, cut on a centred non-overlapping grid at several scales
    (the photo, then halved while a tile fits); photos are first shrunk to at most 12 tiles on the short side,
    since 64 px crops of a 2560 px photo are near-flat patches. Val holds a seeded `val_fraction` of EVERY
    photo's tiles (the stereo motorcycle pair counts as one photo), so the held-out tiles follow the training
    distribution, which is what SWD and FID compare a generator against. (Holding out whole photos instead made
    the val set one or two photos' look: with 22 photos, 5% is a single photo, and a perfect generator of the
    training tiles would still score far from the real-vs-real floor.)

builtin:fashion-mnist (10 classes, grey)
    Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`: idx.gz files under
    /usr/share/datasets/fashion-mnist/). 28x28 padded with black to 32x32; class ids and names as published,
    captions "a photo of a sneaker"; the official train (60k) / test (10k) split is the train / val split
    (`val_fraction` is ignored).

Both are deterministic: same installed files and settings, same tiles, same order.

Prepare them with (OUT may be a path, file:// or s3://; `prepare()` in Python takes the same settings):
    pagoda prepare builtin:photo-tiles work/data/tiles-64 data.resolution=64                     # ~25 s
    pagoda prepare builtin:fashion-mnist work/data/fmnist-32 data.resolution=32 data.channels=1  # ~80 s
Photo tiles at 64 px: 4454 tiles (4231 train / 223 val at val_fraction 0.05) with mate-backgrounds, 1084 from the
pip packages alone; at 128 px 2996, at 256 px 734 (smoke tests only). Fashion-MNIST: 60000 train / 10000 val
(timings on 2 busy cores).
"""
from __future__ import annotations

import gzip
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pagoda_dist.data.order import permutation
from pagoda_dist.data.sources import Source, SourceError, SourceItem, digest_of

MATE_NATURE = Path("/usr/share/backgrounds/mate/nature")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MIN_TILE = 64
MAX_TILES_PER_SIDE = 12

# (file in skimage/data, group): groups share a split; the two stereo views show one scene.
SKIMAGE_PHOTOS = (
    ("astronaut.png", "astronaut"), ("chelsea.png", "chelsea"), ("coffee.png", "coffee"),
    ("hubble_deep_field.jpg", "hubble_deep_field"), ("ihc.png", "ihc"), ("retina.jpg", "retina"),
    ("rocket.jpg", "rocket"), ("motorcycle_left.png", "stereo_motorcycle"),
    ("motorcycle_right.png", "stereo_motorcycle"),
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_CAPTION_NOUNS = ("t-shirt", "pair of trousers", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")
FASHION_PAD = 2  # 28 + 2 * 2 = 32
INSTALL_FASHION = "apt-get install -y dataset-fashion-mnist"


@dataclass(frozen=True)
class Photo:
    name: str   # e.g. "skimage/astronaut.png"
    path: Path
    group: str


def builtin_names() -> tuple[str, ...]:
    return tuple(BUILDERS)


def build(name: str, *, resolution: int, val_fraction: float, seed: int, limit: int | None) -> Source:
    """The items of builtin dataset `name` (see the module docstring); raises SourceError when unavailable."""
    if name not in BUILDERS:
        raise SourceError(f"unknown builtin dataset {name!r}; choose from {', '.join(BUILDERS)}")
    return BUILDERS[name](resolution=resolution, val_fraction=val_fraction, seed=seed, limit=limit)


# --------------------------------------------------------------------------------------------- photo tiles
def installed_photos() -> list[Photo]:
    """The photos available here, in a fixed order: pip packages first, then mate-backgrounds if installed."""
    import skimage.data
    import sklearn.datasets

    photos = []
    skimage_dir = Path(skimage.data.__file__).parent
    for filename, group in SKIMAGE_PHOTOS:
        if (skimage_dir / filename).is_file():
            photos.append(Photo(f"skimage/{filename}", skimage_dir / filename, group))
    sklearn_dir = Path(sklearn.datasets.__file__).parent / "images"
    for filename in SKLEARN_PHOTOS:
        if (sklearn_dir / filename).is_file():
            photos.append(Photo(f"sklearn/{filename}", sklearn_dir / filename, filename.rsplit(".", 1)[0]))
    if MATE_NATURE.is_dir():
        for path in sorted(MATE_NATURE.glob("*.jpg")):
            photos.append(Photo(f"mate/{path.name}", path, f"mate-{path.stem}"))
    return photos


def cut_tiles(img: Image.Image, tile: int) -> list[tuple[str, np.ndarray]]:
    """Non-overlapping tile x tile crops at successive halvings of `img`: (position name, uint8 pixels)."""
    img = img.convert("RGB")
    cap = tile * MAX_TILES_PER_SIDE
    if min(img.size) > cap:
        scale = cap / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS,
                         reducing_gap=3.0)
    tiles, level = [], 0
    while min(img.size) >= tile:
        arr = np.asarray(img)
        rows, cols = img.height // tile, img.width // tile
        top, left = (img.height - rows * tile) // 2, (img.width - cols * tile) // 2
        for r in range(rows):
            for c in range(cols):
                y, x = top + r * tile, left + c * tile
                tiles.append((f"s{level}/r{r}c{c}", arr[y:y + tile, x:x + tile].copy()))
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS)
        level += 1
    return tiles


def photo_tiles(*, resolution: int, val_fraction: float, seed: int, limit: int | None) -> Source:
    photos = installed_photos()
    if not photos:
        raise SourceError("builtin:photo-tiles found no photos (scikit-image / scikit-learn data files missing)")
    tile = max(MIN_TILE, resolution)
    if limit is not None:
        # Tiles per photo are known only after cutting; decode just enough photos, in the fixed order.
        photos = _enough_photos(photos, tile, limit)

    def cut(photo: Photo) -> list[tuple[str, np.ndarray]]:
        with Image.open(photo.path) as img:
            return cut_tiles(img, tile)

    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL releases the GIL while decoding and resizing
        per_photo = list(pool.map(cut, photos))
    items = [SourceItem(name=f"{photo.name}/{where}", pixels=pixels, group=photo.group)
             for photo, tiles in zip(photos, per_photo) for where, pixels in tiles]
    items = items[:limit] if limit is not None else items
    if not items:
        raise SourceError(f"builtin:photo-tiles: no photo is at least {tile}px on its short side")
    notes = _split_within_groups(items, val_fraction, seed)
    notes.append(f"{len(items)} tiles of {tile}px from {len({i.group for i in items})} photos"
                 + ("" if MATE_NATURE.is_dir() else "; apt-get install mate-backgrounds adds 12 photos"))
    digest = digest_of([(p.name, p.path.stat().st_size) for p in photos]
                       + [("limit", limit or 0), ("tile", tile), ("split", "within-photo")])
    return Source("builtin:photo-tiles", items, digest=digest, notes=notes)


def _enough_photos(photos: list[Photo], tile: int, limit: int) -> list[Photo]:
    chosen, total = [], 0
    for photo in photos:
        if total >= limit and len({p.group for p in chosen}) >= 2:
            break
        with Image.open(photo.path) as img:
            w, h = img.size
        chosen.append(photo)
        total += _tile_count(w, h, tile)
    return chosen


def _tile_count(w: int, h: int, tile: int) -> int:
    scale = min(1.0, tile * MAX_TILES_PER_SIDE / min(w, h))
    w, h, n = round(w * scale), round(h * scale), 0
    while min(w, h) >= tile:
        n += (w // tile) * (h // tile)
        w, h = w // 2, h // 2
    return n


def _split_within_groups(items: list[SourceItem], val_fraction: float, seed: int) -> list[str]:
    """Puts round(val_fraction x size) of each group's items, chosen in a seeded order, into val; the rest in train.
    The rounding error is carried from group to group, so val holds val_fraction of all items to within one."""
    by_group: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_group.setdefault(item.group, []).append(index)
    val, carry = set(), 0.0
    for number, group in enumerate(sorted(by_group)):
        members = by_group[group]
        want = val_fraction * len(members) + carry
        take = round(want)
        carry = want - take
        val.update(members[k] for k in permutation((seed, 11, number), len(members))[:take])
    for index, item in enumerate(items):
        item.split = "val" if index in val else "train"
    if not val:
        return []
    return [f"val: {len(val)} tiles, a seeded {val_fraction:.0%} of each of {len(by_group)} photos"]


# -------------------------------------------------------------------------------------------- fashion-mnist
def read_idx(path: Path, count: int | None = None) -> np.ndarray:
    """An idx(.gz) array (the MNIST file format: magic, dimensions, uint8 data); only the first `count` records
    are read (and decompressed) when given."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
            if zero != 0 or dtype != 0x08:
                raise ValueError(f"not an unsigned-byte idx file (magic {zero:#x} {dtype:#x})")
            shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            if count is not None:
                shape = (min(count, shape[0]), *shape[1:])
            expected = int(np.prod(shape))
            data = np.frombuffer(f.read(expected), dtype=np.uint8)
    except (OSError, EOFError, ValueError, struct.error) as err:
        raise SourceError(f"{path}: unreadable idx file ({err}); reinstall with `{INSTALL_FASHION}`") from None
    if data.size != expected:
        raise SourceError(f"{path}: holds {data.size} bytes, its header says {shape}; reinstall the package")
    return data.reshape(shape)


def fashion_mnist(*, resolution: int, val_fraction: float, seed: int, limit: int | None) -> Source:
    del resolution, seed  # stored at 32px and resized by prepare; the official order is kept
    files = {split: (FASHION_DIR / f"{stem}-images-idx3-ubyte.gz", FASHION_DIR / f"{stem}-labels-idx1-ubyte.gz")
             for split, stem in (("train", "train"), ("val", "t10k"))}
    missing = [str(p) for pair in files.values() for p in pair if not p.is_file()]
    if missing:
        raise SourceError(f"builtin:fashion-mnist needs Debian's dataset-fashion-mnist ({missing[0]} is missing); "
                          f"install it with `{INSTALL_FASHION}`")
    labels = {split: read_idx(lbl) for split, (_, lbl) in files.items()}
    n_train, n_val = len(labels["train"]), len(labels["val"])
    if limit is not None:  # keep the official 6:1 proportion in small subsets
        n_val = min(n_val, max(1, round(limit * n_val / (n_train + n_val))) if limit > 1 else 0)
        n_train = min(n_train, limit - n_val)
    items = []
    for split, count in (("train", n_train), ("val", n_val)):
        images = read_idx(files[split][0], count)
        for i in range(count):
            label = int(labels[split][i])
            name = f"fashion-mnist/{split}/{i}"
            items.append(SourceItem(name=name, pixels=np.pad(images[i], FASHION_PAD), cls=label,
                                    caption=fashion_caption(label), group=name, split=split))
    digest = digest_of([(str(p), p.stat().st_size) for pair in files.values() for p in pair] + [("limit", limit or 0)])
    notes = ["official train/test split used as train/val (val_fraction ignored)"] if val_fraction else []
    return Source("builtin:fashion-mnist", items, class_names=list(FASHION_CLASSES), digest=digest, notes=notes)


def fashion_caption(label: int) -> str:
    """"a photo of a sneaker" / "a photo of an ankle boot"."""
    noun = FASHION_CAPTION_NOUNS[label]
    return f"a photo of {'an' if noun[0] in 'aeiou' else 'a'} {noun}"


BUILDERS = {"photo-tiles": photo_tiles, "fashion-mnist": fashion_mnist}
