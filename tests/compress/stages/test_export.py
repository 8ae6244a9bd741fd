"""The export stage: writes the artifact, and the stage's size is exactly the file's, even when entropy-coded
index streams make the file smaller than the tensors held in memory."""
from pathlib import Path
from types import SimpleNamespace

from compress.evaluate import storage_bytes
from compress.format.artifact import read_artifact_parts
from compress.stages.export import ExportConfig, export
from tests.compress.format.test_container import many_layer_model


def test_export_stage_size_is_the_file_size(tmp_path: Path) -> None:
    model, manifest = many_layer_model(40)
    logs = []
    recipe = SimpleNamespace(task="detection", image_size=32, to_dict=lambda: {"name": "t"},
                             train=SimpleNamespace(eval_batch_size=4))
    ctx = SimpleNamespace(run_dir=tmp_path, is_main=True, model_spec=lambda: dict(manifest["model"]),
                          model_meta=manifest["model_meta"], recipe=recipe, finished=[], log=logs.append,
                          accelerator=SimpleNamespace(wait_for_everyone=lambda: None), file_overhead_bytes=0)
    export(model, ExportConfig(), ctx)
    path = tmp_path / "model.safetensors"
    assert storage_bytes(model) + ctx.file_overhead_bytes == path.stat().st_size
    _, _, layout = read_artifact_parts(path)
    assert layout["version"] == 2 and any(len(e) == 5 for e in layout["index"]["tensors"])
    assert logs and "export: wrote" in logs[0]
