"""`voc`: detection from Pascal VOC xml (Annotations/*.xml + JPEGImages/).

VOC pixel coordinates are 1-based and inclusive, so a box becomes xyxy (xmin - 1, ymin - 1, xmax, ymax).
Class names: the `classes` option (then any other name is an error), else the sorted set of object
names over every xml file of the dataset (all splits, so ids agree between splits).
Splits: root/<split>/Annotations (split sub-folders), else ImageSets/Main/<split>.txt when present,
calib falling back to train in both; otherwise a hash of each xml file's name (val 20 %, calib 10 %);
use_all=True keeps every image.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
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
from calib.images import IMAGE_EXTENSIONS, check_image_size, read_image_size, safe_relative
from calib.registry import SPLITS, register_source
from calib.splits import split_subfolder

BOX_KEYS = ("xmin", "ymin", "xmax", "ymax")


def parse_xml(path: Path) -> ET.Element:
    """Root element of an annotation file."""
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(f"{path}: malformed XML ({e})") from e


def text(element: ET.Element, tag: str, where: str) -> str:
    """Stripped text of a required child element."""
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"{where} has no <{tag}>")
    return child.text.strip()


def number(element: ET.Element, tag: str, where: str) -> float:
    """A required numeric child element."""
    value = text(element, tag, where)
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{where}: <{tag}> is not a number ({value!r})") from None


def object_names(path: Path) -> list[str]:
    """Names of the objects of one annotation file."""
    return [text(obj, "name", f"{path}: object {k}") for k, obj in enumerate(parse_xml(path).iter("object"))]


def find_image(folder: Path, xml: Path, root: ET.Element) -> Path:
    """The image an annotation describes: <filename> in JPEGImages/, else the xml's stem with any extension."""
    name = root.findtext("filename")
    candidates = [folder / safe_relative(name.strip(), str(xml))] if name and name.strip() else []
    candidates += [folder / (xml.stem + ext) for ext in IMAGE_EXTENSIONS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"{xml}: image '{name or xml.stem}' not found in {folder}")


def parse_annotation(xml: Path, images: Path, class_ids: dict[str, int], origin: str) -> Record:
    """One annotation file as a record."""
    root = parse_xml(xml)
    image = find_image(images, xml, root)
    size = root.find("size")
    if size is not None and size.find("width") is not None:
        width, height = number(size, "width", f"{xml}: <size>"), number(size, "height", f"{xml}: <size>")
    else:
        width, height = read_image_size(image)
    if width <= 0 or height <= 0:
        width, height = read_image_size(image)
    boxes, labels = [], []
    for k, obj in enumerate(root.iter("object")):
        where = f"{xml}: object {k}"
        name = text(obj, "name", where)
        if name not in class_ids:
            raise DataError(f"{where} has unknown class name '{name}' (classes from {origin}: {', '.join(class_ids)})")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataError(f"{where} has no <bndbox>")
        given = [number(bndbox, key, where) for key in BOX_KEYS]
        x1, y1, x2, y2 = given
        boxes.append(normalise_box([x1 - 1, y1 - 1, x2, y2], width, height, where, given))
        labels.append(class_ids[name])
    return make_record(image, boxes, labels, (int(width), int(height)))


def listed(folder: Path, split: str) -> list[str] | None:
    """Image ids of ImageSets/Main/<split>.txt (calib falls back to train.txt), or None without ImageSets."""
    main = folder / "ImageSets" / "Main"
    present = [s for s in SPLITS if (main / f"{s}.txt").is_file()]
    if not present:
        return None
    chosen = split if split in present else "train" if split == "calib" and "train" in present else None
    if chosen is None:
        raise DataError(f"{main}: has {', '.join(s + '.txt' for s in present)} but no {split}.txt")
    lines = (main / f"{chosen}.txt").read_text(encoding="utf-8").splitlines()
    where = str(main / f"{chosen}.txt")
    return [safe_relative(line.split()[0], where) for line in lines if line.strip()]


@register_source("voc")
def voc(
    split: str,
    root: str | Path,
    classes: list[str] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    use_all: bool = False,
) -> DetectionFiles:
    """Pascal VOC detection; images resized to a square image_size, boxes scaled with them."""
    base = check_root(root)
    size = check_image_size(image_size, str(base))
    here = split_subfolder(base, split)
    folder = here or base
    annotations, images = folder / "Annotations", folder / "JPEGImages"
    for needed in (annotations, images):
        if not needed.is_dir():
            raise DataError(f"{needed}: path does not exist (VOC layout needs Annotations/ and JPEGImages/)")
    xmls = sorted(annotations.glob("*.xml"))
    if not xmls:
        raise DataError(f"{annotations}: empty folder (no .xml annotations)")
    if classes is not None:
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
            raise DataError(f"{base}: option classes must be a list of class names (got {classes!r})")
        names, origin = list(classes), "option classes"
    else:
        folders = [base / s / "Annotations" for s in SPLITS] if here is not None else [annotations]
        every = [x for f in folders if f.is_dir() for x in sorted(f.glob("*.xml"))]
        names, origin = sorted({n for x in every for n in object_names(x)}), "the xml files"
    class_ids = {name: i for i, name in enumerate(names)}
    ids = listed(folder, split) if here is None else None
    if ids is not None:
        by_stem = {x.stem: x for x in xmls}
        missing = [i for i in ids if i not in by_stem]
        if missing:
            main = folder / "ImageSets" / "Main"
            raise DataError(f"{main}: lists '{missing[0]}' but {annotations / missing[0]}.xml does not exist")
        xmls = [by_stem[i] for i in ids]
    records = [parse_annotation(x, images, class_ids, origin) for x in xmls]
    if here is None and ids is None:
        records = pick_split(records, [x.name for x in xmls], split, use_all, annotations)
    return DetectionFiles(records, names, size)
