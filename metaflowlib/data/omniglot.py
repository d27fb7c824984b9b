"""Omniglot (Lake et al. 2015) from the npz mirror, the official folder/zip layout, or a download.

Every source is verified by SHA-256 before use. The decoded image arrays of
the official zips equal the npz mirror's arrays, so one content digest
(`IMAGES_SHA256`) verifies all three sources.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaflowlib.errors import DataError
from metaflowlib.io import atomic_path, sha256_file

SETS = ("background", "evaluation")
FILE_SHA256 = {
    "omniglot/images_background.npz": "8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199",
    "omniglot/images_evaluation.npz": "0b84c7ffd94c4841c0040e529c86a82eaaccb986d8eadad5673f7991b7475276",
    "omniglot/alphabets.tsv": "cb2837e6c0edcfe14c19b3be9b60223cf76fb6ccde7674caf4499ed92caac4af",
    "omniglot/splits/vinyals/train.txt": "984522c194c30fb678ce53304a160a42faf5403ad4f9a67010f32dd3a35738e0",
    "omniglot/splits/vinyals/val.txt": "11f99e54faee3e26f53d3231c1cceac5bf7b8730e9be31cb6dab256551dc0c1a",
    "omniglot/splits/vinyals/test.txt": "845264cc5c156180828ccf17915668b17ee21424d0170df6e7d81676aa5d1204",
}
# SHA-256 of `images` (bool [n_characters, 20, 105, 105], C order, True = paper) per set.
IMAGES_SHA256 = {
    "background": "97db6dcdf39955c3a949e197621f8f318092986b37e116c9b4996150e8d2d8a3",
    "evaluation": "a76180acf0908643e1a9494a1a841d2af4bbbbdc6d7e01e0db92eed7d1c6f902",
}
DOWNLOAD_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_{set}.zip"
SPLIT_URL = "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals/{split}.txt"
_PNG = re.compile(r"(?:^|/)(?P<alphabet>[^/]+)/character(?P<k>\d+)/(?P<id>\d+)_(?P<drawer>\d+)\.png$")


@dataclass(frozen=True)
class Character:
    """One character class: `<alphabet>/character<k>` of a set, with its drawings."""

    set: str
    alphabet: str
    k: int

    @property
    def name(self) -> str:
        return f"{self.alphabet}/character{self.k:02d}"


@dataclass
class OmniglotSet:
    """One of the two official sets: images bool [C, 20, 105, 105] (True = paper) and its characters."""

    name: str
    images: np.ndarray
    characters: list[Character]


def verify_file(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}")


def verify_images(set_name: str, images: np.ndarray, origin: str) -> None:
    actual = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    if actual != IMAGES_SHA256[set_name]:
        raise DataError(f"{origin}: decoded Omniglot {set_name} images do not match the official data (sha256 {actual})")


def read_alphabets(path: Path) -> dict[str, list[tuple[str, int, int]]]:
    """set -> [(alphabet, first_index, n_characters)] from alphabets.tsv."""
    table: dict[str, list[tuple[str, int, int]]] = {s: [] for s in SETS}
    if not path.is_file():
        raise DataError(f"missing Omniglot file {path}")
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 4 or fields[1] not in SETS or not (fields[2].isdigit() and fields[3].isdigit()):
            raise DataError(f"{path}:{number}: expected 'alphabet<TAB>set<TAB>first_index<TAB>n_characters', got {line!r}")
        table[fields[1]].append((fields[0], int(fields[2]), int(fields[3])))
    return table


def load_npz_mirror(root: Path, verify: bool = True) -> list[OmniglotSet]:
    """Read `<root>/omniglot/{images_*.npz, alphabets.tsv}` (the layout of ../shared/data)."""
    if verify:
        for rel, digest in FILE_SHA256.items():
            if rel.endswith((".npz", ".tsv")):
                path = root / rel
                if not path.is_file():
                    raise DataError(f"missing Omniglot file {path}")
                verify_file(path, digest)
    table = read_alphabets(root / "omniglot" / "alphabets.tsv")
    sets = []
    for set_name in SETS:
        path = root / "omniglot" / f"images_{set_name}.npz"
        try:
            with np.load(path) as archive:
                images = archive["images"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            raise DataError(f"cannot read {path}: {error}") from None
        characters = [Character(set_name, a, k) for a, _, n in table[set_name] for k in range(1, n + 1)]
        # bool, True = paper: a uint8 array would wrap to garbage in prepare's `* 255`
        if images.dtype != np.bool_ or images.ndim != 4 or images.shape[0] != len(characters) or images.shape[1] < 2:
            raise DataError(f"{path}: images must be bool [{len(characters)} characters, >= 2 drawings, height, width] "
                            f"(True = paper), got {images.dtype} {list(images.shape)}")
        sets.append(OmniglotSet(set_name, images, characters))
    return sets


def _decode_pngs(entries: dict[str, bytes], origin: str, set_name: str) -> OmniglotSet:
    """Pack `<alphabet>/character<k>/<id>_<drawer>.png` files by character, drawers in order."""
    from PIL import Image

    by_character: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    first: tuple[str, tuple[int, ...]] | None = None  # (entry, shape): every drawing must share its size
    for name, data in entries.items():
        match = _PNG.search(name)
        if not match:
            continue
        key = (match["alphabet"], int(match["k"]))
        try:
            with Image.open(io.BytesIO(data)) as png:
                # compare, don't cast: PIL's mode-"1" arrays can hold 255 for True, which breaks byte digests
                image = np.asarray(png.convert("L")) > 127
        except (OSError, ValueError) as error:  # PIL: unidentified or truncated file
            raise DataError(f"{origin}: {name} is not a readable image: {error}") from None
        if first is None:
            first = (name, image.shape)
        elif image.shape != first[1]:
            raise DataError(f"{origin}: {name} is {image.shape[0]}x{image.shape[1]} pixels but {first[0]} is {first[1][0]}x{first[1][1]}")
        by_character.setdefault(key, {})[int(match["drawer"])] = image
    if not by_character:
        raise DataError(f"{origin}: no '<alphabet>/character<k>/<id>_<drawer>.png' files found")
    keys = sorted(by_character)
    counts = [len(by_character[k]) for k in keys]
    usual = max(set(counts), key=counts.count)
    odd = [f"{a}/character{k:02d} ({n})" for (a, k), n in zip(keys, counts) if n != usual]
    if odd:
        raise DataError(f"{origin}: characters have different numbers of drawings: {usual} for most, but {', '.join(odd[:10])}")
    images = np.stack([np.stack([by_character[k][d] for d in sorted(by_character[k])]) for k in keys])
    return OmniglotSet(set_name, images, [Character(set_name, a, k) for a, k in keys])


def load_official_folder(root: Path, set_name: str) -> OmniglotSet:
    """Read an unpacked `images_<set>/` folder (or any folder of that layout); an empty character folder is refused."""
    empty = [str(d.relative_to(root)) for d in sorted(root.glob("*/character*")) if d.is_dir() and not any(d.glob("*.png"))]
    if empty:
        raise DataError(f"{root}: character folders without drawings: {', '.join(empty[:10])}")
    files = sorted(root.rglob("*.png"))
    entries = {str(p.relative_to(root)): p.read_bytes() for p in files}
    return _decode_pngs(entries, str(root), set_name)


def load_official_zip(path: Path, set_name: str) -> OmniglotSet:
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {n: archive.read(n) for n in archive.namelist() if n.endswith(".png")}
    except zipfile.BadZipFile as error:
        raise DataError(f"{path} is not a valid zip: {error}") from None
    return _decode_pngs(entries, str(path), set_name)


def download(url: str, target: Path) -> None:
    """Fetch `url` into `target` atomically; the caller verifies the content."""
    print(f"downloading {url}", flush=True)
    try:
        with atomic_path(target) as tmp, urllib.request.urlopen(url, timeout=60) as response:
            tmp.write_bytes(response.read())
    except OSError as error:
        raise DataError(f"cannot download {url}: {error}") from None


def download_official(cache_dir: Path) -> list[OmniglotSet]:
    """Fetch the official zips into `cache_dir` and verify their decoded content by SHA-256."""
    sets = []
    for set_name in SETS:
        target = cache_dir / f"images_{set_name}.zip"
        if not target.exists():
            download(DOWNLOAD_URL.format(set=set_name), target)
        omniglot_set = load_official_zip(target, set_name)
        verify_images(set_name, omniglot_set.images, str(target))
        sets.append(omniglot_set)
    return sets


def vinyals_split_dir(root: Path | None, cache_dir: Path) -> Path:
    """`<root>/omniglot/splits/vinyals`, else Snell et al.'s published split files, downloaded and verified."""
    if root is not None and (root / "omniglot" / "splits" / "vinyals").is_dir():
        return root / "omniglot" / "splits" / "vinyals"
    target = cache_dir / "omniglot" / "splits" / "vinyals"
    for split in ("train", "val", "test"):
        path = target / f"{split}.txt"
        if not path.exists():
            download(SPLIT_URL.format(split=split), path)
        verify_file(path, FILE_SHA256[f"omniglot/splits/vinyals/{split}.txt"])
    return target


def find_source(explicit: str | None, project_root: Path) -> Path | None:
    """The data root: `data.source`, then $METAFLOWLIB_DATA, then ../shared/data; None -> download."""
    for origin, candidate in (("data.source", explicit), ("$METAFLOWLIB_DATA", os.environ.get("METAFLOWLIB_DATA"))):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.exists():
                raise DataError(f"{origin} points at {path}, which does not exist")
            return path
    shared = project_root.parent / "shared" / "data"
    return shared if shared.exists() else None


def load_omniglot(root: Path | None, cache_dir: Path, verify: bool = True) -> list[OmniglotSet]:
    """Both sets from `root` in whichever layout it holds, else from the official download.

    Layouts: the npz mirror (`omniglot/images_*.npz`), official zips
    (`images_background.zip`), or unpacked folders (`images_background/`).
    `verify=False` skips the SHA-256 checks (for deliberately modified copies).
    """
    if root is None:
        return download_official(cache_dir)
    if (root / "omniglot" / "images_background.npz").exists():
        return load_npz_mirror(root, verify)
    sets = []
    for set_name in SETS:
        zipped, folder = root / f"images_{set_name}.zip", root / f"images_{set_name}"
        if zipped.is_file():
            omniglot_set = load_official_zip(zipped, set_name)
        elif folder.is_dir():
            omniglot_set = load_official_folder(folder, set_name)
        else:
            raise DataError(
                f"{root} holds no Omniglot data: expected omniglot/images_{set_name}.npz, "
                f"images_{set_name}.zip or images_{set_name}/"
            )
        if verify:
            verify_images(set_name, omniglot_set.images, str(root))
        sets.append(omniglot_set)
    return sets
