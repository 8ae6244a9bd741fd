import subprocess
import sys
from pathlib import Path

import pytest

from compress.cli import main


def test_misspelt_stage_exits_2_with_one_line_and_no_traceback(tiny_recipe_path: Path, tmp_path: Path) -> None:
    tiny_recipe_path.write_text(tiny_recipe_path.read_text().replace("- evaluate:", "- evaluat:"))
    done = subprocess.run([sys.executable, "-m", "compress", "run", str(tiny_recipe_path), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown stage 'evaluat'; did you mean 'evaluate'?" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "r").exists(), "no work may start on a bad recipe"


def test_bad_set_and_missing_recipe_exit_2(tiny_recipe_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", str(tiny_recipe_path), "--out", str(tmp_path / "r"), "--set", "stages.0.finetune.lr=-1"]) == 2
    assert "stages.0.finetune.lr" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "recipe file not found" in capsys.readouterr().err


def test_inspect_prints_params_and_macs(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "compress:digits-cnn", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "params" in out and "MACs" in out
    assert main(["inspect", "compress:nope"]) == 2


def test_inspect_manifest_prints_json_and_byte_breakdown(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from compress.format.artifact import write_artifact
    from compress.format.breakdown import byte_breakdown
    from compress.models import build_model

    path = tmp_path / "model.safetensors"
    write_artifact(path, build_model("compress:digits-cnn", num_classes=10),
                   {"model": {"build": "compress:digits-cnn", "num_classes": 10, "options": {}}, "metrics": {"top1": 0.5}})
    assert main(["inspect", str(path), "--manifest"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads(out[: out.index("\nformat version")])
    assert manifest["version"] == 2 and manifest["metrics"] == {"top1": 0.5} and "index" not in manifest
    sizes = byte_breakdown(path)
    assert f"{sizes['file']:,}" in out and "safetensors header" in out and "batch norm" in out
    assert main(["inspect", str(tmp_path / "none.safetensors"), "--manifest"]) == 2


def test_help_shows_examples(capsys: pytest.CaptureFixture) -> None:
    # in-process, as test_every_help_has_examples (`python -m compress run` in a fresh process, its exit code
    # included, is test_misspelt_stage_exits_2_with_one_line_and_no_traceback's)
    assert main(["run", "--help"]) == 0
    assert "Example:" in capsys.readouterr().out


# ---- shrink, export, exit codes, --quiet (issue 7) ----------------------------------------------------------

SHRINK_FAST = ["--model", "compress:digits-cnn", "--num-classes", "10", "--method", "rtn", "--bits", "4",
               "--calib-samples", "8", "--batch-size", "8"]


@pytest.fixture(scope="module")
def state_dict_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from compress.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "model.pt"
    torch.save(build_model("compress:digits-cnn", num_classes=10).state_dict(), path)
    return path


def test_shrink_writes_a_loadable_artifact(state_dict_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    import compress

    out = tmp_path / "small.safetensors"
    assert main(["shrink", str(state_dict_file), *SHRINK_FAST, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "preprocessing: compress: model" in printed and "before: 123,898 params" in printed
    assert f"wrote {out}: {out.stat().st_size:,} bytes" in printed and "bits/weight" in printed
    assert compress.load(out)(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    assert main(["eval", str(out), "--data", "digits:val", "--json"]) == 0
    assert '"top1"' in capsys.readouterr().out


def test_quiet_prints_only_the_result(state_dict_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "q.safetensors"
    assert main(["--quiet", "shrink", str(state_dict_file), *SHRINK_FAST, "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines() == [captured.out.strip()] and captured.out.startswith("wrote ")
    assert captured.err == ""
    assert main(["-q", "eval", str(out), "--data", "digits:val"]) == 0
    assert capsys.readouterr().out.startswith("top1=")


def test_shrink_bad_checkpoint_exits_2_with_one_line(state_dict_file: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    import torch

    state = torch.load(state_dict_file, weights_only=True)
    state.pop("head.bias")
    state["stray"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    assert main(["shrink", str(bad), *SHRINK_FAST, "-o", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "missing keys: head.bias" in err and "unexpected keys: stray" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()
    assert main(["shrink", str(tmp_path / "nope.pt"), *SHRINK_FAST, "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shrink_quant_options(state_dict_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import compress

    out = tmp_path / "o.safetensors"
    base = ["shrink", str(state_dict_file), *SHRINK_FAST, "-o", str(out)]
    for item, says in [("calib_steps", "--quant-option 'calib_steps': expected KEY=VALUE"),
                       ("no_such=1", "unknown field 'no_such'"), ("ignore=[head", "--quant-option ignore: not valid YAML"),
                       ("bits=2", "--quant-option bits: give it as --bits"), ("method=kmeans", "give it as --method")]:
        assert main([*base, "--quant-option", item]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    assert main([*base, "--quant-option", "ignore=[head]", "--quant-option", "max_samples=512"]) == 0
    plan = compress.load(out).quantization_plan
    assert plan["options"]["ignore"] == ["head"] and "head" not in {e["name"] for e in plan["layers"]}
    assert plan["options"]["max_samples"] == 512


def test_usage_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["shrink", "none", "--model", "compress:digits-cnn"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Missing option" in err and "--help" in err
    assert main(["shrnk"]) == 2
    assert "No such command" in capsys.readouterr().err
    assert main(["shrink", "none", *SHRINK_FAST, "--bits", "many", "-o", "x.safetensors"]) == 2


def test_failures_exit_1_one_line_and_traceback_with_debug(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    import compress.evaluate.report as report

    def broken(run_dir):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(report, "write_report", broken)
    assert main(["report", "some-run"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: RuntimeError: disk on fire ... (run with --debug for the traceback)"
    assert main(["--debug", "report", "some-run"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_export_onnx_wiring(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import types

    calls = []

    def export_onnx(artifact, out, dense=False, **options):
        calls.append((Path(artifact), Path(out), dense, options))
        return {"path": str(out), "bytes": 12345, "ratio": 1.07}

    monkeypatch.setitem(sys.modules, "compress.onnx", types.SimpleNamespace(export_onnx=export_onnx))
    artifact = tmp_path / "model.safetensors"
    artifact.write_bytes(b"x")
    assert main(["export", str(artifact), "--onnx", str(tmp_path / "m.onnx"), "--dense"]) == 0
    assert calls == [(artifact, tmp_path / "m.onnx", True, {})]
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'm.onnx'}: 12,345 bytes, 1.07x the artifact, dense weights"
    assert main(["export", str(artifact), "--onnx", str(tmp_path / "n.onnx"), "--opset", "17"]) == 0
    assert calls[-1][2:] == (False, {"opset": 17})
    assert main(["export", str(tmp_path / "missing.safetensors"), "--onnx", "o.onnx"]) == 2
    assert main(["export", str(artifact)]) == 2  # --onnx is required


@pytest.mark.parametrize("command", [[], ["shrink"], ["export"], ["eval"], ["inspect"], ["report"]])
def test_every_help_has_examples(command: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Example" in out, out


def test_quiet_run_keeps_the_table_and_the_log_file(tiny_recipe_path: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "r"
    assert main(["--quiet", "run", str(tiny_recipe_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stage" in printed and "finetune" in printed, "the result table is still printed"
    assert "] stage 1/3" not in printed and "epoch 1/1" not in printed, "info lines are silenced"
    assert "stage 1/3: finetune" in (out / "log.txt").read_text(), "log.txt keeps them"
    assert main(["eval", str(out / "stages/01-finetune/model.safetensors"), "--data", "digits:val"]) == 0
    assert capsys.readouterr().out.startswith("top1="), "a stage checkpoint evaluates too"


@pytest.mark.slow
def test_retain_freed_memory_stops_page_faults_of_repeated_large_tensors() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    probe = ("import resource, sys, torch\n"
             "from compress.cli import retain_freed_memory\n"
             "applied = retain_freed_memory() if sys.argv[1] == 'on' else False\n"
             "torch.ones(1)\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "for _ in range(20):\n"
             "    torch.ones(64 << 18)  # 64 MB, allocated and freed\n"
             "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")

    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True
                             ).stdout.split()
        return out[0], int(out[1])

    applied, on = faults("on")
    if applied != "True":
        pytest.skip("not glibc")
    _, off = faults("off")
    assert on * 2 < off, (on, off)  # each 64 MB tensor faults its 16k pages in again without it
    # the opt-out is read before anything is applied, so it is checked in this process (no third start-up)
    from compress.cli import retain_freed_memory

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPRESS_MALLOC", "default")
        assert retain_freed_memory() is False
