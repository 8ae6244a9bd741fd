"""`yolo`: detection from YOLO txt labels (`class cx cy w h` per line, normalised to [0, 1]).

Layouts: root/images/ + root/labels/ (a label file mirrors its image's path under labels/ with .txt;
an image without one has no objects). Splits: root/<split>/images + root/<split>/labels, or
root/images/<split> + root/labels/<split> (Ultralytics), calib falling back to train; otherwise a hash
of each image's path under images/ (val 20 %, calib 10 %); use_all=True keeps every image.
Class names: the `classes` option, else `names` in root/data.yaml (a list or an {id: name} map), else
root/classes.txt (one per line), else "0".."K-1" with K = 1 + the largest class id in any label file.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from calib.detection_files import (
    DEFAULT_IMAGE_SIZE,
    DetectionFiles,
    Record,
    check_label,
    make_record,
    normalise_box,
    pick_split,
)
from calib.errors import DataError
from calib.folders import check_root
from calib.images import check_image_size, list_images
from calib.registry import SPLITS, register_source
from calib.splits import split_subfolder

NORMALISED_TOLERANCE = 0.005


def split_dirs(base: Path, split: str) -> tuple[Path, Path, bool]:
    """(images dir, labels dir, whether the folder layout already selects the split)."""
    here = split_subfolder(base, split)
    if here is not None:
        return here / "images", here / "labels", True
    nested = [s for s in SPLITS if (base / "images" / s).is_dir()]
    if nested:
        chosen = split if split in nested else "train" if split == "calib" and "train" in nested else None
        if chosen is None:
            raise DataError(f"{base / 'images'}: has split sub-folders ({', '.join(nested)}) but no '{split}/'")
        return base / "images" / chosen, base / "labels" / chosen, True
    return base / "images", base / "labels", False


def all_label_dirs(base: Path) -> list[Path]:
    """Every labels folder of the dataset, whatever the split layout."""
    found = [base / s / "labels" for s in SPLITS] + [base / "labels"]
    return [d for d in found if d.is_dir()]


def read_names(base: Path, classes: list[str] | None) -> tuple[list[str] | None, str]:
    """Class names and where they came from (None when nothing names them)."""
    if classes is not None:
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
            raise DataError(f"{base}: option classes must be a list of class names (got {classes!r})")
        return list(classes), "option classes"
    data_yaml = base / "data.yaml"
    if data_yaml.is_file():
        try:
            from compress.safe_yaml import YAMLInputError, load as strict_load  # aliases bounded, no duplicate keys
        except ImportError:  # calib used without compress
            YAMLInputError, strict_load = yaml.YAMLError, lambda text, _where: yaml.safe_load(text)
        try:
            data = strict_load(data_yaml.read_bytes(), str(data_yaml))
        except (yaml.YAMLError, YAMLInputError) as e:
            raise DataError(f"{data_yaml}: malformed YAML ({e})") from None
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, list):
            if not all(isinstance(n, (str, int, float)) for n in names):
                raise DataError(f"{data_yaml}: 'names' must list plain class names")
            return [str(n) for n in names], str(data_yaml)
        if isinstance(names, dict):
            if sorted(names) != list(range(len(names))):
                raise DataError(f"{data_yaml}: 'names' keys must be the ids 0..{len(names) - 1} (got {sorted(names)})")
            return [str(names[i]) for i in range(len(names))], str(data_yaml)
        raise DataError(f"{data_yaml}: malformed data.yaml (needs 'names': a list or an {{id: name}} map)")
    classes_txt = base / "classes.txt"
    if classes_txt.is_file():
        lines = classes_txt.read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip()], str(classes_txt)
    return None, "label files"


def parse_label_file(path: Path) -> tuple[list[list[float]], list[int], list[int]]:
    """Normalised xyxy boxes, raw class ids (checked by the caller) and line numbers of a label file."""
    boxes, labels, lines = [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}: line {n}"
        if len(parts) != 5:
            raise DataError(
                f"{where}: malformed line (expected 'class cx cy w h', got {len(parts)} values: {line.strip()!r})"
            )
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise DataError(f"{where}: malformed line (non-numeric value in {line.strip()!r})") from None
        if not values[0].is_integer():
            raise DataError(f"{where}: malformed line (class id must be an integer, got {parts[0]!r})")
        cx, cy, w, h = values[1:]
        xyxy = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        boxes.append(normalise_box(xyxy, 1.0, 1.0, where, values[1:], tolerance=NORMALISED_TOLERANCE))
        labels.append(int(values[0]))
        lines.append(n)
    return boxes, labels, lines


@register_source("yolo")
def yolo(
    split: str,
    root: str | Path,
    classes: list[str] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    use_all: bool = False,
) -> DetectionFiles:
    """YOLO txt detection; images resized to a square image_size, boxes scaled with them."""
    base = check_root(root)
    size = check_image_size(image_size, str(base))
    images_dir, labels_dir, selected = split_dirs(base, split)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: path does not exist (YOLO layout needs images/ and labels/)")
    files = list_images(images_dir, recursive=True)
    if not files:
        raise DataError(f"{images_dir}: empty folder (no images)")
    if not labels_dir.is_dir():
        raise DataError(f"{labels_dir}: path does not exist (YOLO layout needs labels/ beside images/)")
    names, origin = read_names(base, classes)
    if names is None:
        ids = [i for d in all_label_dirs(base) for txt in d.rglob("*.txt") for i in parse_label_file(txt)[1]]
        names = [str(i) for i in range(max(ids, default=-1) + 1)]
    records: list[Record] = []
    for image in files:
        txt = (labels_dir / image.relative_to(images_dir)).with_suffix(".txt")
        boxes, labels, lines = parse_label_file(txt) if txt.is_file() else ([], [], [])
        for label, n in zip(labels, lines):
            check_label(label, len(names), f"{txt}: line {n}", origin)
        records.append(make_record(image, boxes, labels))
    if not selected:
        keys = [f.relative_to(images_dir).as_posix() for f in files]
        records = pick_split(records, keys, split, use_all, images_dir)
    return DetectionFiles(records, names, size)
