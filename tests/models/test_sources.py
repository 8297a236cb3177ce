"""Model sources (`exporter/models/sources.py`): torchvision:, timm:, file.py:factory, .onnx and Python objects,
through the same build → verify → bench as the zoo, and the Python API."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import exporter
from exporter.cli import main
from exporter.errors import UsageError
from exporter.fileio import sha256_file as sha256_of
from exporter.manifest import load_build
from exporter.models import create_model, get_spec
from exporter.models.registry import UnknownModelError
from exporter.models.sources import is_source, torchvision_classification_models
from exporter.paths import model_dir
from tests.conftest import TEST_NUM_CLASSES

FAST = ["--backends", "onnx,onnxruntime", "--parity-samples", "8", "--max-batch", "8"]
USER_MODEL = '''
"""A small user model."""
from torch import nn

INPUT_SHAPE = (1, 20, 20)


def make(num_classes: int = 10) -> nn.Module:
    """Conv, BatchNorm, pooled head."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, num_classes))


def fixed_head() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))


def not_a_module():
    return 42
'''


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_net.py"
    path.write_text(USER_MODEL)
    return path


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


# --- resolving a source ----------------------------------------------------------------------------------------


def test_torchvision_source_is_a_spec_with_a_folder_name() -> None:
    spec = get_spec("torchvision:mobilenet_v3_small")
    assert spec.source == "torchvision" and spec.input_shape == (3, 224, 224) and spec.num_classes == 1000
    assert ":" not in spec.folder and model_dir(spec.name, "/a").name == spec.folder
    net = create_model(spec.name, num_classes=TEST_NUM_CLASSES).eval()
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, TEST_NUM_CLASSES)
    assert "mobilenet_v3_large" in torchvision_classification_models()
    assert "fasterrcnn_resnet50_fpn" not in torchvision_classification_models()  # detection is not classification


def test_torchvision_training_only_heads_are_off() -> None:
    net = create_model("torchvision:googlenet", num_classes=TEST_NUM_CLASSES).train()
    out = net(torch.rand(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, TEST_NUM_CLASSES)  # no auxiliary outputs


def test_unknown_torchvision_name_suggests_close_ones() -> None:
    with pytest.raises(UnknownModelError, match=r"did you mean torchvision:mobilenet_v3_large"):
        get_spec("torchvision:mobilenet_v3_larg")
    with pytest.raises(UsageError, match="3 input channels"):
        create_model("torchvision:resnet18", in_channels=1)


def test_timm_source() -> None:
    pytest.importorskip("timm")
    spec = get_spec("timm:resnet10t")
    assert spec.source == "timm" and spec.input_shape[0] == 3
    net = create_model(spec.name, in_channels=1, num_classes=TEST_NUM_CLASSES).eval()
    assert net(torch.rand(1, 1, 64, 64)).shape == (1, TEST_NUM_CLASSES)


def test_file_source_reads_its_input_shape_and_head(user_file: Path) -> None:
    spec = get_spec(f"{user_file}:make")
    assert spec.source == "file" and spec.input_shape == (1, 20, 20) and spec.num_classes == 10
    assert spec.origin["sha256"] and spec.name == f"{user_file.resolve()}:make"
    assert create_model(spec.name, num_classes=TEST_NUM_CLASSES)(torch.rand(1, 1, 20, 20)).shape[1] == TEST_NUM_CLASSES
    assert get_spec(f"{user_file}:fixed_head").num_classes == 3


@pytest.mark.parametrize("name, pattern", [
    ("missing.py:make", r"does not exist"),
    ("{file}:nope", r"has no function 'nope'; it defines fixed_head, make, not_a_module"),
    ("{file}:not_a_module", r"returned int, not a torch.nn.Module"),
    ("{file}:1bad", r"must be a function name"),
    ("{broken}:make", r"importing broken.py failed: NameError"),
])
def test_bad_file_sources_fail_in_one_line(user_file: Path, name: str, pattern: str) -> None:
    broken = user_file.with_name("broken.py")
    broken.write_text("undefined_name\n")
    with pytest.raises(UsageError, match=pattern) as info:
        get_spec(name.format(file=user_file, broken=broken))
    assert "\n" not in str(info.value)


def test_what_is_a_source() -> None:
    assert is_source("torchvision:resnet18") and is_source("net.py:make") and is_source("x/model.ONNX")
    assert not is_source("resnet18")
    with pytest.raises(UnknownModelError, match="unknown model source"):
        get_spec("keras:resnet")


# --- build → verify → bench ------------------------------------------------------------------------------------


def test_file_source_builds_verifies_and_benches(user_file: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    art = str(tmp_path / "art")
    name = f"{user_file}:make"
    assert main(["build", name, "--artifacts", art, *FAST, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == str(user_file.resolve()) + ":make"
    assert Path(summary["build_dir"]).parent.name == get_spec(name).folder
    manifest = json.loads(Path(summary["manifest"]).read_text())
    assert manifest["source"] == "file" and manifest["origin"]["factory"] == "make" and manifest["reference"] == "eager"
    assert manifest["weights"]["source"] == "factory" and manifest["input_shape"] == [1, 20, 20]
    assert main(["verify", name, "--artifacts", art, "--samples", "8"]) == 0
    assert "parity vs eager (eager fp32)" in capsys.readouterr().out
    assert main(["bench", name, "--artifacts", art, "--batch-sizes", "1", "--json"]) in (0, 3)
    cells = json.loads(capsys.readouterr().out)["cells"]
    assert {c["label"] for c in cells} >= {"eager", "onnx-fp32"}
    assert main(["report", "--artifacts", art]) == 0  # every model with a build: found by folder, not by name
    assert (Path(art) / "reports" / f"{get_spec(name).folder}.md").is_file()
    assert sorted(p.name for p in user_file.parent.iterdir() if p.suffix in (".md", ".json", ".csv")) == []


def test_bare_state_dict_checkpoint(user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = f"{user_file}:make"
    torch.manual_seed(3)
    net = create_model(name, num_classes=TEST_NUM_CLASSES)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    result = exporter.build(name, checkpoint=tmp_path / "weights.pt", artifacts_dir=tmp_path / "art",
                            backends=["onnx"], parity_samples=8, max_batch=8)
    assert result.manifest["weights"]["source"] == "state dict" and result.manifest["num_classes"] == TEST_NUM_CLASSES
    exported = create_model(name, num_classes=TEST_NUM_CLASSES)
    from safetensors.torch import load_file

    exported.load_state_dict(load_file(str(result.build_dir / "weights.safetensors")))
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), net.state_dict().values()))
    wrapped = {"model": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3}  # a training script's
    torch.save(wrapped, tmp_path / "wrapped.pt")
    again = exporter.build(name, checkpoint=tmp_path / "wrapped.pt", artifacts_dir=tmp_path / "art2",
                           backends=["onnx"], parity_samples=8, max_batch=8)
    assert again.manifest["weights"]["sha256"] == sha256_of(tmp_path / "wrapped.pt")
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    code = main(["build", name, "--checkpoint", str(tmp_path / "wrong.pt"), "--artifacts", str(tmp_path / "b"), *FAST])
    assert code != 0 and re.search(r"does not fit .* with 10 classes: missing", _error(capsys))
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").rglob("manifest.json"))


def _tiny_onnx(path: Path, batch: int | str = "N") -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["scores"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                            [batch, 1, 12, 12])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 5])],
                              initializer=[weight, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def test_onnx_source_is_judged_against_the_reference_evaluator(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    source = _tiny_onnx(tmp_path / "tiny.onnx")
    spec = get_spec(str(source))
    assert spec.input_shape == (1, 12, 12) and spec.num_classes == 5
    art = str(tmp_path / "art")
    assert main(["build", str(source), "--artifacts", art, "--fp16", "--parity-samples", "8", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    build = load_build(summary["build_dir"])
    assert build.manifest["reference"] == "onnx-reference" and build.reference.backend == "onnx_reference"
    names = [a.name for a in build.artifacts]
    assert names[0] == "onnx-reference" and "onnx-fp32" in names and "eager" not in names
    assert {s["backend"] for s in build.manifest["skipped"]} >= {"inductor", "aoti"}
    assert main(["verify", str(source), "--artifacts", art, "--samples", "8"]) == 0
    assert "parity vs onnx-reference (onnx_reference fp32)" in capsys.readouterr().out
    assert main(["bench", str(source), "--artifacts", art, "--batch-sizes", "1", "--json"]) in (0, 3)
    bench = json.loads(capsys.readouterr().out)
    assert bench["macs_per_image"] == 12 * 12 * 4 * 9 + 4 * 5  # Conv and MatMul, counted from the graph


def test_onnx_source_fixed_batch_and_refused_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _tiny_onnx(tmp_path / "fixed.onnx", batch=1)
    art = str(tmp_path / "art")
    assert main(["build", str(source), "--artifacts", art, "--batch", "4"]) == 2
    assert "fixed batch of 1" in _error(capsys)
    assert main(["build", str(source), "--artifacts", art, "--backends", "inductor"]) != 0
    assert "ONNX file" in _error(capsys)
    assert main(["build", str(source), "--artifacts", art, "--parity-samples", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["artifacts"]


# --- the Python API --------------------------------------------------------------------------------------------


def test_api_builds_a_module_object(tmp_path: Path) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(4, TEST_NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    torch.manual_seed(1)
    net = Net()
    result = exporter.build(net, example_input=torch.rand(1, 3, 16, 16), backends=["onnx", "onnxruntime"],
                            artifacts_dir=tmp_path, parity_samples=8, max_batch=8)
    assert result.manifest["weights"]["source"] == "python object" and result.manifest["num_classes"] == 7
    report = exporter.verify(result, samples=8)
    assert bool(report) and {r.label for r in report.results} >= {"onnx-fp32"}
    assert "eager" not in {r.label for r in report.results}  # the reference is not judged against itself
    timings = exporter.bench(result, batch_sizes=(1,), budget_s=0.05, min_runs=3)
    assert {c["label"] for c in timings["cells"]} == {"eager", "onnx-fp32"}
    with pytest.raises(UsageError, match="needs example_input"):
        exporter.build(net)
    with pytest.raises(UsageError, match="unknown build option"):
        exporter.build(net, example_input=(3, 16, 16), colour="red")


def test_readme_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README.md lost its API example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)  # noqa: S102  (our own README)
    assert bool(namespace["report"]) and namespace["timings"]["cells"]


DATA_DEPENDENT = '''
import torch
from torch import nn

INPUT_SHAPE = (1, 12, 12)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 4))
        self.b = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 4))

    def forward(self, x):
        if x.mean() > 0.5:  # data-dependent control flow: torch.export cannot trace it
            return self.a(x)
        return self.b(x)


def make():
    return Branchy()
'''


def test_a_model_torch_export_cannot_trace_still_builds_the_others(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "branchy.py"
    path.write_text(DATA_DEPENDENT)
    code = main(["build", f"{path}:make", "--artifacts", str(tmp_path / "art"), "--parity-samples", "4",
                 "--max-batch", "4", "--json"])
    summary = json.loads(capsys.readouterr().out)
    failed = {f["backend"]: f["error"] for f in summary["failed"]}
    assert code == 3 and "torch.export" in failed and "torch.export failed" in failed["torch.export"]
    assert "aoti" in failed and "torch.export failed" in failed["aoti"]
    built = {a["name"] for a in summary["artifacts"]}
    assert {"eager", "inductor"} <= built  # torch.compile takes the graph break
    manifest = json.loads(Path(summary["manifest"]).read_text())
    assert manifest["exported_program"] is None and "error" in manifest["diagnostics"]["export"]


def test_a_file_source_trains_like_the_zoo(user_file: Path, tmp_path: Path) -> None:
    from exporter.train import train

    summary = train(f"{user_file}:make", epochs=1, max_steps=6, batch_size=32, artifacts_dir=tmp_path,
                    test_images=64, progress=False)
    assert summary["input_shape"] == [1, 20, 20] and summary["steps"] == 6
    assert (model_dir(f"{user_file}:make", tmp_path) / "checkpoint.safetensors").is_file()
    result = exporter.build(f"{user_file}:make", artifacts_dir=tmp_path, backends=["onnx"], parity_samples=4,
                            max_batch=4)
    assert result.manifest["weights"]["source"] == "checkpoint" and result.manifest["weights"]["trained"]


def test_a_library_model_that_cannot_be_built_on_meta_still_resolves() -> None:
    from exporter.models import check_input_shape, model_summary

    check_input_shape("torchvision:regnet_y_400mf", (3, 64, 64))  # its constructor calls .tolist() on tensors
    assert model_summary("torchvision:regnet_y_400mf")["macs"] > 0


def test_weights_load_into_a_module_that_wants_its_version(tmp_path: Path) -> None:
    """safetensors keeps no `_metadata`; torchvision's MNASNet refuses a state dict without its version."""
    from safetensors.torch import load_file, save_file

    from exporter.checkpoint import load_weights

    net = create_model("torchvision:mnasnet0_5", num_classes=TEST_NUM_CLASSES)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    fresh = create_model("torchvision:mnasnet0_5", num_classes=TEST_NUM_CLASSES)
    load_weights(fresh, load_file(str(tmp_path / "w.safetensors")))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
