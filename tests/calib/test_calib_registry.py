"""The source registry: lookup, option checking, did-you-mean errors, and the dataset attributes."""

from __future__ import annotations

import pytest
from torch.utils.data import Dataset

import calib
from calib.registry import _SOURCES


def test_builtin_sources_are_registered():
    expected = {"digits", "digits-detect", "folder", "coco", "yolo", "voc"}
    assert expected <= set(calib.list_sources()), f"missing sources: {expected - set(calib.list_sources())}"
    assert calib.list_sources() == sorted(calib.list_sources()), "list_sources() must be sorted"


def test_data_error_is_a_value_error():
    assert issubclass(calib.DataError, ValueError), "DataError must subclass ValueError (contract)"


def test_unknown_source_lists_names_and_suggests():
    with pytest.raises(calib.DataError) as info:
        calib.get_dataset("digts", "train")
    message = str(info.value)
    assert "unknown data source 'digts'" in message, message
    assert "did you mean 'digits'" in message, message
    for name in calib.list_sources():
        assert name in message, f"known source {name} not listed in: {message}"


def test_unknown_split_is_named():
    with pytest.raises(calib.DataError, match=r"unknown split 'valid'.*train, val, calib.*did you mean 'val'"):
        calib.get_dataset("digits", "valid")


def test_unknown_option_is_named():
    with pytest.raises(calib.DataError) as info:
        calib.get_dataset("digits-detect", "val", image_sise=64)
    message = str(info.value)
    assert "unknown option 'image_sise'" in message and "did you mean 'image_size'" in message, message
    assert "num_images" in message, f"known options should be listed: {message}"


def test_generated_source_refuses_root_and_file_source_needs_it(tmp_path):
    with pytest.raises(calib.DataError, match="'digits' is generated and takes no root"):
        calib.get_dataset("digits", "train", root=str(tmp_path))
    with pytest.raises(calib.DataError, match=r"source 'folder' reads files: pass root="):
        calib.get_dataset("folder", "train")


def test_register_source_rejects_duplicates_and_registers_new():
    try:

        @calib.register_source("test-tiny")
        def tiny(split: str, size: int = 2) -> Dataset:
            """A two-item dataset."""
            return [(split, i) for i in range(size)]  # type: ignore[return-value]

        assert "test-tiny" in calib.list_sources()
        assert calib.get_dataset("test-tiny", "calib", size=3) == [("calib", 0), ("calib", 1), ("calib", 2)]
        with pytest.raises(calib.DataError, match="'test-tiny' is already registered"):
            calib.register_source("test-tiny")(tiny)
        with pytest.raises(calib.DataError, match="'digits' is already registered"):
            calib.register_source("digits")(tiny)
    finally:
        _SOURCES.pop("test-tiny", None)


def test_every_generated_dataset_has_the_contract_attributes():
    for source, options, task in [("digits", {}, "classification"), ("digits-detect", {"num_images": 2}, "detection")]:
        ds = calib.get_dataset(source, "val", **options)
        assert ds.task == task, f"{source}.task = {ds.task}"
        assert ds.num_classes == 10 and ds.class_names == [str(d) for d in range(10)], f"{source} classes"
        assert isinstance(ds.image_size, int) and ds[0][0].shape == (3, ds.image_size, ds.image_size), source
