"""Checkpoint round trips (safetensors and torch files) and mismatch errors that name the file and keys."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from compress.models import CheckpointError, build_model, load_checkpoint


def _trained_like(spec: str = "compress:digits-cnn") -> torch.nn.Module:
    """A model whose weights and BN statistics differ from a fresh build."""
    torch.manual_seed(1)
    model = build_model(spec, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.train()(torch.rand(4, 3, 32, 32))  # moves BN running stats
    return model.eval()


@pytest.mark.parametrize("layout", ["raw", "state_dict", "model"])
def test_torch_round_trip(tmp_path, layout: str) -> None:
    model = _trained_like()
    sd = model.state_dict()
    obj = sd if layout == "raw" else {layout: sd, "epoch": 3}
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    torch.manual_seed(2)
    loaded = build_model("compress:digits-cnn", num_classes=10, checkpoint=str(path)).eval()
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))


def test_safetensors_round_trip(tmp_path) -> None:
    model = _trained_like()
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = build_model("compress:digits-cnn", num_classes=10, checkpoint=str(path)).eval()
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))


def test_yolo_safetensors_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("compress:yolo-n", num_classes=3).eval()
    path = tmp_path / "yolo.safetensors"
    save_file(model.state_dict(), str(path))
    torch.manual_seed(5)
    loaded = build_model("compress:yolo-n", num_classes=3, checkpoint=str(path)).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), loaded(x)))


def test_mismatch_names_file_and_keys(tmp_path) -> None:
    sd = build_model("compress:digits-cnn", num_classes=10).state_dict()
    path = tmp_path / "bad.pt"

    missing = dict(sd)
    del missing["head.weight"]
    torch.save(missing, path)
    with pytest.raises(CheckpointError) as e:
        build_model("compress:digits-cnn", num_classes=10, checkpoint=str(path))
    assert "bad.pt" in str(e.value) and "missing keys: head.weight" in str(e.value)

    torch.save({**sd, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.weight"):
        build_model("compress:digits-cnn", num_classes=10, checkpoint=str(path))

    with pytest.raises(CheckpointError) as e:  # 10-class checkpoint into a 4-class model
        torch.save(sd, path)
        build_model("compress:digits-cnn", num_classes=4, checkpoint=str(path))
    assert "head.weight (checkpoint (10, 64) vs model (4, 64))" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_unreadable_and_missing_files(tmp_path) -> None:
    model = build_model("compress:digits-cnn", num_classes=10)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(model, tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt.*cannot be read"):
        load_checkpoint(model, junk)
    notsd = tmp_path / "list.pt"
    torch.save([1, 2, 3], notsd)
    with pytest.raises(CheckpointError, match="list.pt.*not a state dict"):
        load_checkpoint(model, notsd)


class _Versioned(torch.nn.Module):
    """Reads its state-dict version when loading, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_a_state_without_versions_gets_the_models_own(tmp_path):
    from safetensors.torch import load_file, save_file

    from compress.models.checkpoint import load_state

    source = _Versioned()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "v.safetensors"))
    plain = load_file(str(tmp_path / "v.safetensors"))  # a plain dict: no _metadata
    target = _Versioned()
    with pytest.raises(ValueError, match="version should be set"):
        target.load_state_dict(plain)
    load_state(target, plain)
    assert torch.equal(target.conv.weight, source.conv.weight)
