"""Bounded resources: YAML aliases and duplicate keys, image pixels, images that do not decode."""
from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import pytest

from calib import DataError
from tests.hostile.conftest import RUN_RECIPE, refused

BOMB = """
a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_yaml_alias_bomb_in_model_options(capsys, tmp_path) -> None:
    bomb = "\n".join("  " + line for line in BOMB.strip().splitlines())
    text = RUN_RECIPE.replace('model: {build: "compress:digits-cnn", num_classes: 10}',
                              'model:\n  build: "compress:digits-cnn"\n  num_classes: 10\n  options:\n    bomb:\n'
                              + "\n".join("  " + line for line in bomb.splitlines()))
    recipe = _write(tmp_path / "src" / "bomb.yaml", text)
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "out")], r"aliases expand the document past 100,000",
            tmp_path)
    from compress import safe_yaml

    start = time.perf_counter()  # the refusal itself is cheap (the 1e9-node document is never built)
    with pytest.raises(safe_yaml.YAMLInputError):
        safe_yaml.load(recipe.read_text(), "bomb.yaml")
    assert time.perf_counter() - start < 1


def test_small_alias_bomb_past_the_node_limit(capsys, tmp_path) -> None:
    # few alias uses (under the count limit) that still expand past the node limit: 10 levels of 10 aliases
    # would be 100 uses; 6 levels of 2 * 10-element lists stay under it but expand 1e6-fold
    lines = ['a0: &a0 [' + ", ".join(['"x"'] * 50) + ']']
    for k in range(1, 6):
        lines.append(f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 16) + "]")
    recipe = _write(tmp_path / "src" / "bomb.yaml", "\n".join(lines) + "\n")
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "out")], r"aliases expand the document past", tmp_path)


def test_bomb_in_a_set_value(capsys, tmp_path) -> None:
    recipe = _write(tmp_path / "src" / "r.yaml", RUN_RECIPE)
    value = "{a: &a [x,x,x,x,x,x,x,x,x,x], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]," \
            " d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d," \
            "*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d," \
            "*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]}"
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "out"), "--set", f"model.options.x={value}"],
            r"--set model\.options\.x: not valid YAML \(.*alias", tmp_path)


def test_duplicate_keys(capsys, tmp_path) -> None:
    recipe = _write(tmp_path / "src" / "r.yaml", RUN_RECIPE.replace("seed: 0\n", "seed: 0\nseed: 1\n"))
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "out")], r"duplicate key 'seed' \(first at line 3\)",
            tmp_path)


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [200_000, 12_000])
def test_png_decompression_bomb(tmp_path, capsys, side) -> None:
    import calib

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(_png_header(side, side))
    data = calib.get_dataset("folder", "calib", root=folder, use_all=True)
    with pytest.raises(DataError, match=r"bomb\.png: image (too large to decode|of 12000x12000 pixels is over)"):
        data[0]
    refused(capsys, ["shrink", "none", "--model", "compress:digits-cnn", "--num-classes", "10", "--method", "rtn",
                     "--calib", str(folder), "--image-size", "32", "-o", str(tmp_path / "o.safetensors")],
            r"bomb\.png: image", tmp_path)


def _image_folder(root: Path, truncated: bool) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(2):
                Image.new("RGB", (40, 40), (k * 90, 30, 200)).save(folder / f"{k}.jpg", quality=90)
    if truncated:
        victim = root / "train" / "b" / "1.jpg"
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) * 2 // 3])
    return root


def test_truncated_jpeg_found_before_training(capsys, tmp_path) -> None:
    root = _image_folder(tmp_path / "data", truncated=True)
    text = RUN_RECIPE.replace("train: {source: digits, split: train, samples: 16}",
                              f"train: {{source: folder, split: train, root: {root}, options: {{image_size: 32}}}}")
    text = text.replace("val: {source: digits, split: val, samples: 16}",
                        f"val: {{source: folder, split: val, root: {root}, options: {{image_size: 32}}}}")
    text = text.replace("num_classes: 10", "num_classes: 2").replace("- evaluate: {split: val}",
                                                                     "- finetune: {epochs: 2}")
    recipe = _write(tmp_path / "src" / "r.yaml", text)
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "out")], r"1\.jpg: cannot (decode|read) image", tmp_path)
    assert not (tmp_path / "out").exists()


def test_zlib_bomb_manifest(corpus, tmp_path) -> None:
    import base64
    import hashlib
    import zlib

    from compress.format.artifact import ArtifactError, load
    from compress.format.checkpoint import atomic_save_safetensors

    text = " " * 70_000_000  # 70 MB of spaces: ~70 KB compressed
    meta = {"format": "compress-artifact/1", "manifest_encoding": "zlib+base64",
            "manifest": base64.b64encode(zlib.compress(text.encode(), 9)).decode(),
            "manifest_sha256": hashlib.sha256(text.encode()).hexdigest()}
    path = tmp_path / "zbomb.safetensors"
    atomic_save_safetensors(path, dict(corpus["tensors"]), meta)
    with pytest.raises(ArtifactError, match="inflates past 64,000,000 bytes"):
        load(path)


def test_yolo_data_yaml_bomb(tmp_path) -> None:
    import calib

    root = tmp_path / "yolo"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(root / "images" / "a.jpg")
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text(BOMB + "names: *i\n")
    with pytest.raises(DataError, match=r"data\.yaml: malformed YAML .*aliases expand"):
        calib.get_dataset("yolo", "train", root=root, use_all=True)


def test_huge_recipe_file(capsys, tmp_path) -> None:
    (tmp_path / "src").mkdir()
    recipe = tmp_path / "src" / "r.yaml"
    recipe.write_text(RUN_RECIPE + "#" * 2_000_000 + "\n")
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "out")], r"too large for a recipe", tmp_path)


def test_deeply_nested_yaml(capsys, tmp_path) -> None:
    (tmp_path / "src").mkdir()
    recipe = tmp_path / "src" / "r.yaml"
    recipe.write_text("a: " + "[" * 3000 + "]" * 3000 + "\n")
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "out")], r"nested", tmp_path)


def test_deeply_nested_manifest_json(corpus, tmp_path) -> None:
    from compress.format.artifact import ArtifactError, load
    from tests.hostile.conftest import write_forged_artifact

    path = write_forged_artifact(tmp_path / "deep.safetensors", corpus["tensors"], None,
                                 raw_manifest="[" * 100_000 + "]" * 100_000)
    with pytest.raises(ArtifactError, match="manifest is not valid JSON"):
        load(path)


def test_truncated_image_in_a_coco_set_found_by_the_check(tmp_path) -> None:
    import json

    from PIL import Image

    import calib

    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    Image.effect_noise((64, 64), 60).convert("RGB").save(root / "images" / "a.jpg", quality=95)
    data = (root / "images" / "a.jpg").read_bytes()
    (root / "images" / "a.jpg").write_bytes(data[: len(data) // 2])
    ann = {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}],
           "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations.json").write_text(json.dumps(ann))
    dataset = calib.get_dataset("coco", "train", root=root, use_all=True)
    with pytest.raises(DataError, match=r"a\.jpg: cannot (decode|read) image"):
        dataset.check_images()


@pytest.mark.parametrize("override, pattern", [("image_size=100000", r"image_size: Input should be less than or equal to 8192"),
                                               ("model.num_classes=1000000000",
                                                r"model\.num_classes: Input should be less than or equal to 100000")])
def test_careless_sizes_in_a_recipe(capsys, tmp_path, override, pattern) -> None:
    (tmp_path / "src").mkdir()
    recipe = tmp_path / "src" / "r.yaml"
    recipe.write_text(RUN_RECIPE)
    refused(capsys, ["run", str(recipe), "--out", str(tmp_path / "out"), "--set", override], pattern, tmp_path)


def test_careless_image_size_in_shrink(capsys, tmp_path) -> None:
    refused(capsys, ["shrink", "none", "--model", "compress:digits-cnn", "--num-classes", "10", "--image-size",
                     "100000", "-o", str(tmp_path / "o.safetensors")], r"--image-size 100000 is over the limit", tmp_path)
