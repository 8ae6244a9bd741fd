"""`folder`: a user's image folder, labelled by sub-folder (classification) or flat and unlabelled.

Layouts (root is the `root` argument):
- root/<class>/**/<image>: classification; class names are the sorted sub-folder names.
- root/<image>: unlabelled images (label -1, num_classes 0), e.g. calibration data.
Splits: when root has train/, val/ or calib/ sub-folders, each split reads its own (calib falls back to
train/ when there is no calib/); the class list is the union over them, so ids agree across splits.
Otherwise files are split by a hash of their path relative to root (val 20 %, calib 10 %, train the
rest): stable when files are added, and disjoint. `use_all=True` skips the hash split and gives every
file to the requested split (for a folder given only for calibration or evaluation).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from calib.errors import DataError
from calib.images import check_decodes, check_image_size, list_images, load_image
from calib.registry import register_source
from calib.splits import select_by_hash, split_subfolder, split_subfolders

DEFAULT_IMAGE_SIZE = 224


class ImageFolder(Dataset):
    """Image files with integer labels (-1 when unlabelled): items are (float32 [3, S, S], label)."""

    task = "classification"

    def __init__(self, files: list[Path], labels: list[int], class_names: list[str], image_size: int):
        self.files, self.labels = files, labels
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = load_image(self.files[index], self.image_size)
        return image, self.labels[index]

    def check_images(self) -> None:
        """Decode every image once (runs call this before training): a damaged file fails before epoch 1."""
        for path in self.files:
            check_decodes(path, self.image_size)


def check_root(root: str | Path) -> Path:
    """`root` as a Path, which must be an existing folder."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{path}: path does not exist")
    if not path.is_dir():
        raise DataError(f"{path}: expected a folder, found a file")
    return path


def class_folders(folder: Path) -> list[Path]:
    """Visible sub-folders of `folder`, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan(folder: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """Images per class sub-folder (recursive), and the loose images directly in `folder`."""
    classes = {d.name: list_images(d, recursive=True) for d in class_folders(folder)}
    return {name: files for name, files in classes.items() if files}, list_images(folder)


@register_source("folder")
def folder(split: str, root: str | Path, image_size: int = DEFAULT_IMAGE_SIZE, use_all: bool = False) -> ImageFolder:
    """Images of a folder: class sub-folders, or a flat unlabelled folder; resized to image_size."""
    base = check_root(root)
    size = check_image_size(image_size, str(base))
    here = split_subfolder(base, split)
    data = here or base
    classes, loose = scan(data)
    if classes and loose:
        raise DataError(
            f"{data}: has both class sub-folders ({', '.join(sorted(classes))}) and loose images "
            f"({loose[0].name}, ...); put every image in a class sub-folder, or use a flat folder"
        )
    if not classes and not loose:
        raise DataError(f"{data}: empty folder (no images with extensions .jpg, .png, ...; none in sub-folders)")
    if here is not None:
        names = sorted({c for d in split_subfolders(base).values() for c in scan(d)[0]})
    else:
        names = sorted(classes)
    if classes:
        files = [f for c in sorted(classes) for f in classes[c]]
        labels = [names.index(c) for c in sorted(classes) for _ in classes[c]]
    else:
        files, labels = loose, [-1] * len(loose)
    if here is None:
        keep = select_by_hash([f.relative_to(data).as_posix() for f in files], split, use_all, data)
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    return ImageFolder(files, labels, names if classes else [], size)
