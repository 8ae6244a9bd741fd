"""Group keys from stride x module family, explicit patterns, and `describe_groups` for the CLI."""
import pytest
import torch

from compress.errors import RecipeError
from compress.models import build_model
from compress.prune import ScopeConfig, describe_groups
from compress.prune.groups import GroupAssigner, auto_key, family, ratio_for


def test_family_drops_leaf_indices_and_digits():
    assert family("backbone.stage3.1.cv1.bn") == "backbone.stage"
    assert family("neck.td4.m.0.cv1.bn") == "neck.td"
    assert family("head.0.cls.1.bn") == "head.cls"
    assert family("layer2.0.bn1") == "layer"
    assert family("bn1") == "bn", "a top-level layer is its own family"
    assert family("neck.bu5.cv2.bn", depth=1) == "neck"
    assert auto_key("neck.td3.cv1.bn", 8) == "stride8/neck.td"
    assert auto_key("conv_head", None) == "global/conv_head"


def test_explicit_groups_glob_and_regex_first_match_wins():
    assign = GroupAssigner({"early": ["backbone.stage[23].*"], "deep": ["re:backbone\\.stage[45]\\..*"],
                            "all": ["*"]})
    assert assign("backbone.stage2.1.cv1.bn", 4) == "early"
    assert assign("backbone.stage5.0.bn", 32) == "deep"
    assert assign("neck.td3.cv1.bn", 8) == "all"
    partial = GroupAssigner({"early": ["backbone.stage2.*"]})
    assert partial("neck.td3.cv1.bn", 8) == "stride8/neck.td", "unmatched layers keep their automatic key"
    with pytest.raises(RecipeError, match="not a valid regular expression"):
        GroupAssigner({"x": ["re:("]})


def test_ratio_for_exact_then_patterns():
    ratios = {"stride8/neck.td": 0.3, "stride8/*": 0.5, "*": 0.1}
    assert ratio_for("stride8/neck.td", ratios) == 0.3
    assert ratio_for("stride8/head.cls", ratios) == 0.5
    assert ratio_for("stride32/head.cls", ratios) == 0.1
    assert ratio_for("x", {"y": 0.2}) is None


def test_describe_groups_on_yolo_n():
    model = build_model("compress:yolo-n", num_classes=3)
    rows = describe_groups(model, torch.rand(1, 3, 64, 64))
    prunable = [r for r in rows if r["group"] != "(kept whole)"]
    groups = {r["group"] for r in prunable}
    assert {"stride8/backbone.stage", "stride16/neck.td", "stride16/neck.bu", "stride32/backbone.stage",
            "stride8/head.cls"} <= groups, groups
    assert all(r["score"] == "|gamma|" and r["layers"] > 0 and r["channels"] > 0 for r in prunable), prunable
    assert [r["stride"] for r in prunable] == sorted(r["stride"] for r in prunable), "rows sorted by stride"
    assert set(rows[0]) == {"group", "stride", "family", "score", "layers", "channels", "mean_score", "examples", "note"}
    coarse = describe_groups(model, torch.rand(1, 3, 64, 64), ScopeConfig(family_depth=1))
    assert {r["group"] for r in coarse if r["stride"] == 16} == {"stride16/backbone", "stride16/neck", "stride16/head"}
    named = describe_groups(model, torch.rand(1, 3, 64, 64),
                            ScopeConfig(groups={"backbone": ["backbone.*"], "rest": ["*"]}))
    assert {r["group"] for r in named} == {"backbone", "rest", "(kept whole)"}
    kept = [r for r in rows if r["group"] == "(kept whole)"]
    assert len(kept) == 1 and "produces a model output" in kept[0]["note"] and kept[0]["layers"] == 6, kept


def test_describe_groups_lists_what_stays_whole():
    model = build_model("timm:vit_tiny_patch16_224", num_classes=3, img_size=32)
    rows = describe_groups(model, torch.rand(1, 3, 32, 32))
    kept = [r for r in rows if r["group"] == "(kept whole)"]
    assert kept and "expand" in kept[0]["note"], kept
    assert any(r["group"] == "stride16/blocks.attn" and r["score"] == "magnitude" for r in rows), rows
