"""`coco`: detection from a COCO json (bbox xywh -> xyxy; category ids -> 0..K-1 in sorted id order).

The annotation file is the `annotations` option (absolute, or relative to the split's folder), else the
only .json in the split's folder or its annotations/ sub-folder. Image file names resolve against the
first of: that folder, its images/ sub-folder, the json's folder, its images/ sub-folder. Crowd
annotations (iscrowd=1) are skipped; images without annotations are kept as background.
Splits: train/ val/ calib/ sub-folders of root (each with its json; calib falls back to train/), else a
hash of each image's file_name (val 20 %, calib 10 %); use_all=True keeps every image.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

from calib.detection_files import (
    DEFAULT_IMAGE_SIZE,
    DetectionFiles,
    Record,
    make_record,
    normalise_box,
    pick_split,
)
from calib.errors import DataError
from calib.folders import check_root
from calib.images import check_image_size, read_image_size, safe_relative
from calib.registry import register_source
from calib.splits import split_subfolder


def find_annotations(folder: Path, annotations: str | Path | None) -> Path:
    """The COCO json of a split folder: the option if given, else the only .json there."""
    if annotations is not None:
        path = Path(annotations).expanduser()
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise DataError(f"{path}: path does not exist (option annotations)")
        return path
    found = sorted(folder.glob("*.json")) or sorted(folder.glob("annotations/*.json"))
    if len(found) != 1:
        what = "no .json file" if not found else f"{len(found)} .json files ({', '.join(p.name for p in found)})"
        raise DataError(f"{folder}: expected one COCO annotation .json, found {what}; pass annotations=<file>")
    return found[0]


def read_json(path: Path) -> dict:
    """A COCO json with its images, annotations and categories lists."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: malformed JSON (not UTF-8 text: {e.reason})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: malformed COCO json (top level must be an object, got {type(data).__name__})")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: malformed COCO json (needs a '{key}' list; has {', '.join(data) or 'no keys'})")
    return data


def field(entry: object, key: str, kind: type | tuple[type, ...], where: str) -> object:
    """entry[key], which must exist and be of `kind`."""
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{where} has no '{key}'")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: '{key}' has the wrong type ({value!r})")
    return value


def image_folder(candidates: list[Path], file_name: str, path: Path, image_id: object) -> Path:
    """First candidate folder holding `file_name`."""
    for folder in candidates:
        if (folder / file_name).is_file():
            return folder
    where = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise DataError(f"{path}: image '{file_name}' (id {image_id}) not found under {where}")


def parse_coco(path: Path, folder: Path) -> tuple[list[Record], list[str], list[str]]:
    """Records (in json order), class names and hash keys (file names) of a COCO json."""
    data = read_json(path)
    names: dict[int, str] = {}
    for k, cat in enumerate(data["categories"]):
        names[field(cat, "id", int, f"{path}: category {k}")] = str(field(cat, "name", str, f"{path}: category {k}"))
    ids = sorted(names)
    contiguous = {cid: i for i, cid in enumerate(ids)}
    images: dict[object, dict] = {}
    for k, img in enumerate(data["images"]):
        where = f"{path}: image {k}"
        image_id = field(img, "id", (int, str), where)
        if image_id in images:
            raise DataError(f"{where}: duplicate image id {image_id!r}")
        images[image_id] = {"file": safe_relative(str(field(img, "file_name", str, where)), where),
                            "boxes": [], "labels": []}
        images[image_id]["size"] = (img.get("width"), img.get("height"))
    candidates = [folder, folder / "images", path.parent, path.parent / "images"]
    base = None
    for image_id, img in images.items():
        base = base or image_folder(candidates, img["file"], path, image_id)
        img["path"] = base / img["file"]
        if not img["path"].is_file():
            raise DataError(f"{path}: image '{img['file']}' (id {image_id}) not found under {base}")
        width, height = img["size"]
        if not (isinstance(width, numbers.Real) and isinstance(height, numbers.Real) and width > 0 and height > 0):
            img["size"] = read_image_size(img["path"])
    for k, ann in enumerate(data["annotations"]):
        where = f"{path}: annotation {k}" + (f" (id {ann['id']})" if isinstance(ann, dict) and "id" in ann else "")
        if isinstance(ann, dict) and ann.get("iscrowd", 0):
            continue
        image_id = field(ann, "image_id", (int, str), where)
        if image_id not in images:
            raise DataError(f"{where} refers to unknown image id {image_id!r}")
        category = field(ann, "category_id", int, where)
        if category not in contiguous:
            raise DataError(f"{where} has unknown category id {category} (categories: {', '.join(map(str, ids))})")
        bbox = field(ann, "bbox", list, where)
        if len(bbox) != 4 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in bbox):
            raise DataError(f"{where}: malformed bbox {bbox!r} (expected [x, y, width, height])")
        x, y, w, h = bbox
        img = images[image_id]
        img["boxes"].append(normalise_box([x, y, x + w, y + h], *img["size"], where, bbox))
        img["labels"].append(contiguous[category])
    records = [make_record(img["path"], img["boxes"], img["labels"], img["size"]) for img in images.values()]
    return records, [names[i] for i in ids], [img["file"] for img in images.values()]


@register_source("coco")
def coco(
    split: str,
    root: str | Path,
    annotations: str | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    use_all: bool = False,
) -> DetectionFiles:
    """COCO-format detection; images resized to a square image_size, boxes scaled with them."""
    base = check_root(root)
    size = check_image_size(image_size, str(base))
    here = split_subfolder(base, split)
    folder = here or base
    path = find_annotations(folder, annotations)
    records, class_names, keys = parse_coco(path, folder)
    if not records:
        raise DataError(f"{path}: empty dataset (no images)")
    if here is None:
        records = pick_split(records, keys, split, use_all, path)
    return DetectionFiles(records, class_names, size)
