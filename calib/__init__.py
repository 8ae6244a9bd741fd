"""Data for compress: bundled demo sets and users' files, split into train / val / calib.

`get_dataset(source, split, root=None, **options)` builds one split of a registered source:
- `digits` (classification) and `digits-detect` (detection) are generated offline from scikit-learn's
  digits; their splits never share a digit image.
- `photos` (unlabelled) gives random multi-scale crops of the real photographs that scikit-image,
  scikit-learn and matplotlib ship; val and calib never share a photo.
- `folder`, `coco`, `yolo`, `voc` read a user's files under `root`. A split reads root/<split>/ when
  root has train/ val/ calib/ sub-folders (calib falls back to train/); otherwise files are split by a
  hash of their relative path (val 20 %, calib 10 %, train the rest), so splits are disjoint and stable.
  `use_all=True` gives every file to the requested split (a folder meant only for calibration).
Every dataset has `task`, `num_classes`, `class_names` and `image_size`; bad data raises `DataError`
naming the file and the rule.
"""

from calib import coco, digits, digits_detect, folders, photos, voc, yolo  # noqa: F401  (registers the sources)
from calib.collate import collate_detection
from calib.errors import DataError
from calib.registry import SPLITS, get_dataset, list_sources, register_source

__all__ = ["DataError", "SPLITS", "collate_detection", "get_dataset", "list_sources", "register_source"]
