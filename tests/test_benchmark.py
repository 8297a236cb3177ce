"""`exporter bench` (`exporter/benchmark.py`): what a build's bench times, each cell's parity record, the merge into
`bench.json`, and the command line. The timing method itself is tested in `test_timing.py`, the GEMM peak in
`test_machine.py` and `--tune` in `test_tuning.py`."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path
from typing import Iterator

import pytest

from exporter import benchmark as bench
from exporter import timing
from exporter.backends import BACKENDS
from exporter.backends.base import Artifact
from exporter.benchmark import BenchSettings
from exporter.cli import main
from exporter.errors import UsageError
from exporter.machine import machine_slug
from exporter.manifest import FORMAT_VERSION, load_build, update_manifest
from exporter.results import read_bench, write_parity
from tests.conftest import TEST_NUM_CLASSES
from tests.parity_builds import copy_build, own_build  # noqa: F401  (fixture)

TINY_MODEL = "lenet"
TINY_SHAPE = (1, 28, 28)
FAST = dict(warmup=1, min_runs=3, max_runs=30, budget_s=0.02, block_s=0.005, gemm_size=128)
FAST_ARGS = ["--warmup", "1", "--min-runs", "3", "--budget", "0.01", "--gemm-size", "128"]


def _export_onnx(net, path: Path, *, dynamic: bool = True) -> None:
    """A small ONNX file of the tiny model with the build's weights (TorchScript exporter: fast)."""
    import torch

    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, *TINY_SHAPE),), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes=axes)


def make_tiny_build(root: Path, model: str = TINY_MODEL, *, onnx: bool = False, static_onnx: bool = False,
                    static_batch: int | None = None) -> Path:
    """Write `root/<model>/b1` (weights, manifest, `latest` link) as `exporter build` lays it out.

    Artifacts: eager fp32 and bf16, plus ONNX Runtime fp32 (`onnx`) and a batch-1-only ONNX (`static_onnx`).
    """
    import torch
    from safetensors.torch import save_file

    from exporter.manifest import file_entries, point_latest, write_json_atomic
    from exporter.models import create_model

    build = root / model / "b1"
    build.mkdir(parents=True)
    torch.manual_seed(0)
    net = create_model(model, num_classes=TEST_NUM_CLASSES).eval()
    save_file(net.state_dict(), str(build / "weights.safetensors"))
    options = {"model": model, "in_channels": TINY_SHAPE[0], "num_classes": TEST_NUM_CLASSES}
    artifacts = [Artifact("eager", "eager", "weights.safetensors", "fp32", options=options),
                 Artifact("eager-bf16", "eager", "weights.safetensors", "bf16", options=options)]
    if onnx:
        _export_onnx(net, build / "model.onnx")
        artifacts.append(Artifact("onnx-fp32", "onnxruntime", "model.onnx", "fp32"))
    if static_onnx:
        _export_onnx(net, build / "model.b1.onnx", dynamic=False)
        artifacts.append(Artifact("onnx-static", "onnxruntime", "model.b1.onnx", "fp32"))
    batch = {"dynamic": static_batch is None, "static": static_batch, "min": static_batch or 1,
             "max": static_batch or 16}
    manifest = {"format": FORMAT_VERSION, "build_id": "b1", "model": model, "num_classes": TEST_NUM_CLASSES,
                "in_channels": TINY_SHAPE[0], "input_shape": list(TINY_SHAPE), "untrained": True, "batch": batch,
                "files": file_entries(build), "artifacts": [a.to_dict() for a in artifacts]}
    write_json_atomic(build / "manifest.json", manifest)
    point_latest(build.parent, build)
    return build


@contextlib.contextmanager
def noise_tolerated() -> Iterator[None]:
    """No cell is flagged unstable inside the block: for tests about what happens after a bench (select, report)
    on this shared test machine, whose other processes make sub-millisecond timings noisy. The instability rule
    itself is tested with a scripted clock in `test_timing.py`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timing, "UNSTABLE_CV", math.inf)
        yield


def _need(backend: str) -> None:
    reason = BACKENDS[backend].unavailable_reason("cpu") if backend in BACKENDS else f"{backend} not registered"
    if reason:
        pytest.skip(reason)


def _parity_entry(label: str, status: str = "pass", options: dict | None = None) -> dict:
    from tests.test_results import parity_entry

    return parity_entry(label, status, options=options)


def _write_parity(build_dir: Path, *entries: dict) -> None:
    from tests.test_results import parity_document

    document = parity_document(*entries)
    document["reference"]["weights_sha256"] = "tiny"
    write_parity(build_dir, document, ["eager", "eager-bf16", "onnx-fp32"])


# --- what a build's bench times -----------------------------------------------------------------------------------


def test_targets_carry_their_own_parity_records(tmp_path: Path) -> None:
    build_dir = make_tiny_build(tmp_path, onnx=True)
    build = load_build(TINY_MODEL, tmp_path)
    assert [(t.label, t.parity.status) for t in bench.targets_for_build(build)] == [
        ("eager", "unverified"), ("eager-bf16", "unverified"), ("onnx-fp32", "unverified")]
    _write_parity(build_dir, _parity_entry("eager-bf16", "fail"), _parity_entry("onnx-fp32"),
                  _parity_entry("onnx-fp32+tuned", options={"graph_optimization_level": "extended"}))
    targets = {t.label: t for t in bench.targets_for_build(build)}
    assert targets["eager"].parity.status == "reference" and targets["eager-bf16"].parity.status == "fail"
    assert targets["onnx-fp32"].parity.passed and "onnx-fp32+tuned" not in targets  # no tuning recorded
    winner = {"variant": "opt=basic", "options": {"graph_optimization_level": "basic"}}
    update_manifest(build, "tuning", {"machine": machine_slug(), "artifacts": {"onnx-fp32": winner}})
    targets = {t.label: t for t in bench.targets_for_build(build, ["onnxruntime"])}
    assert list(targets) == ["onnx-fp32", "onnx-fp32+tuned"]
    tuned = targets["onnx-fp32+tuned"]
    assert tuned.variant.options == {"graph_optimization_level": "basic"} and tuned.artifact.name == "onnx-fp32"
    # the record was judged with other options, so it does not vouch for this variant
    assert tuned.parity.status == "unverified" and "judged with options" in tuned.parity.reason
    runner = tuned.variant.runner(tuned.build_dir, threads=2)
    assert runner.options == {"graph_optimization_level": "basic", "intra_op_num_threads": 2}
    assert not bench.targets_for_build(build, ["onnxruntime"], tuned=False)[1:]
    update_manifest(build, "tuning", {"machine": "another-machine-8c", "artifacts": {"onnx-fp32": winner}})
    assert [t.label for t in bench.targets_for_build(build, ["onnxruntime"])] == ["onnx-fp32"]


def test_oracles_only_when_named_and_unknown_names(tmp_path: Path) -> None:
    make_tiny_build(tmp_path)
    build = load_build(TINY_MODEL, tmp_path)
    build.manifest["artifacts"].append(Artifact("onnx-reference", "onnx_reference", "m.onnx", "fp32").to_dict())
    assert "onnx-reference" not in [t.label for t in bench.targets_for_build(build)]
    assert [t.label for t in bench.targets_for_build(build, ["onnx_reference"])] == ["onnx-reference"]
    with pytest.raises(UsageError, match="did you mean onnxruntime"):
        bench.targets_for_build(build, ["onnxruntim"])
    with pytest.raises(UsageError, match="has no artifact of openvino"):
        bench.targets_for_build(build, ["openvino"])


def test_model_costs_on_meta_tensors(tmp_path: Path) -> None:
    make_tiny_build(tmp_path)
    from exporter.models import count_macs, create_model

    macs, activation_bytes = bench.model_costs(load_build(TINY_MODEL, tmp_path))
    assert macs == count_macs(create_model(TINY_MODEL, num_classes=TEST_NUM_CLASSES), (1, *TINY_SHAPE)) > 0
    assert activation_bytes > 0


# --- the timing run on tiny builds ----------------------------------------------------------------------------


def test_bench_tiny_build_two_backends(tmp_path: Path) -> None:
    _need("onnxruntime")
    make_tiny_build(tmp_path, onnx=True)
    build = load_build(TINY_MODEL, tmp_path)
    results = bench.bench_build(build, BenchSettings(batch_sizes=(1, 4), threads=1, **FAST))
    cells = {(c["artifact"], c["batch"]): c for c in results["cells"]}
    assert set(cells) == {(a, b) for a in ("eager", "eager-bf16", "onnx-fp32") for b in (1, 4)}
    for cell in cells.values():
        assert cell["status"] == "ok", cell
        assert cell["n"] >= 3 and 0 < cell["min_ms"] <= cell["p50_ms"] <= cell["p99_ms"]
        assert cell["throughput_ips"] > 0 and cell["gflops"] > 0 and cell["first_call_ms"] > 0
        assert cell["threads"] == 1 and cell["memory"]["peak_mb"] > 0
    assert cells[("eager-bf16", 1)]["executed_precision"] == "bf16"
    assert cells[("eager-bf16", 1)]["peak_class"] == "bf16"
    assert cells[("eager", 1)]["parity"]["status"] == "unverified"  # no parity.json: not even the reference
    assert cells[("onnx-fp32", 1)]["parity"]["status"] == "unverified"
    # the bare-call twin runs at the smallest batch only
    assert "overhead_us" in cells[("onnx-fp32", 1)] and "onnxruntime" in cells[("onnx-fp32", 1)]["bare_call"]
    assert "overhead_us" in cells[("eager", 1)] and "overhead_us" not in cells[("eager", 4)]
    saved = read_bench(build.dir)
    assert saved["peaks_gflops"]["fp32"] > 0 and len(saved["cells"]) == 6 and saved["model"] == TINY_MODEL
    assert saved["peaks_gflops"]["best"]["fp32"] in saved["peaks_gflops"]["sources"]["fp32"]
    section = load_build(TINY_MODEL, tmp_path).manifest["bench"]
    assert section["file"] == "bench.json" and len(section["summary"]) == 6
    assert {row["parity"] for row in section["summary"]} == {"unverified"}


def test_failing_cell_is_recorded_and_others_continue(tmp_path: Path) -> None:
    _need("onnxruntime")
    make_tiny_build(tmp_path, static_onnx=True)
    build = load_build(TINY_MODEL, tmp_path)
    build.manifest["artifacts"].append(Artifact("gone", "eager", "missing.safetensors", "fp32").to_dict())
    results = bench.bench_build(build, BenchSettings(batch_sizes=(1, 3), **FAST), backends=["onnxruntime", "gone"],
                                save=False)
    cells = {(c["artifact"], c["batch"]): c for c in results["cells"]}
    assert cells[("onnx-static", 1)]["status"] == "ok"
    assert cells[("onnx-static", 3)]["status"] == "failed" and cells[("onnx-static", 3)]["error"]
    assert cells[("gone", 1)]["status"] == "failed" and "does not exist" in cells[("gone", 1)]["error"]
    assert not (build.dir / "bench.json").exists()  # save=False


def test_static_batch_build_refuses_other_batch_sizes(tmp_path: Path) -> None:
    make_tiny_build(tmp_path, static_batch=4)
    build = load_build(TINY_MODEL, tmp_path)
    with pytest.raises(UsageError, match="static batch of 4: bench it with --batch-sizes 4"):
        bench.bench_build(build, BenchSettings(batch_sizes=(1, 4), **FAST))
    assert not (build.dir / "bench.json").exists()
    results = bench.bench_build(build, BenchSettings(batch_sizes=(4,), **FAST), backends=["eager"], save=False)
    assert {c["batch"] for c in results["cells"]} == {4}


def test_a_second_run_keeps_the_cells_it_did_not_measure(tmp_path: Path) -> None:
    """A `--backends` subset or other batch sizes merge into bench.json; the manifest summary covers all cells."""
    make_tiny_build(tmp_path)
    build = load_build(TINY_MODEL, tmp_path)
    bench.bench_build(build, BenchSettings(batch_sizes=(1, 2), threads=1, overhead=False, **FAST))
    first = {(c["label"], c["batch"]): c["measured_at"] for c in read_bench(build.dir)["cells"]}
    assert set(first) == {(a, b) for a in ("eager", "eager-bf16") for b in (1, 2)}
    second = bench.bench_build(build, BenchSettings(batch_sizes=(3,), threads=1, overhead=False, **FAST),
                               backends=["eager-bf16"])
    assert [(c["label"], c["batch"]) for c in second["cells"]] == [("eager-bf16", 3)]  # this run's own cells
    merged = read_bench(build.dir)
    cells = {(c["label"], c["batch"]): c["measured_at"] for c in merged["cells"]}
    assert set(cells) == set(first) | {("eager-bf16", 3)}
    assert all(cells[key] == first[key] for key in first)
    assert len(load_build(TINY_MODEL, tmp_path).manifest["bench"]["summary"]) == 5


def test_summarize_reads_each_cells_parity() -> None:
    cells = [{"label": "a", "batch": 1, "status": "ok", "p50_ms": 1.0, "throughput_ips": 1000.0,
              "executed_precision": "fp32", "parity": {"status": "pass"}, "unstable": False},
             {"label": "b", "batch": 1, "status": "failed", "parity": {"status": "unverified"}}]
    rows = bench.summarize({"cells": cells})
    assert [(r["label"], r["parity"], r["p50_ms"]) for r in rows] == [("a", "pass", 1.0), ("b", "unverified", None)]


# --- the command line ---------------------------------------------------------------------------------------------


def test_cli_bench_json_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_tiny_build(tmp_path)
    args = ["bench", TINY_MODEL, "--artifacts", str(tmp_path), "--batch-sizes", "2", *FAST_ARGS,
            "--backends", "eager", "--json"]
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert [c["batch"] for c in results["cells"]] == [2, 2] and results["settings"]["warmup"] == 1
    for bad in (["--batch-sizes", "0,8"], ["--threads", "0"], ["--min-runs", str(10**7 + 1)], ["--budget", "inf"],
                ["--artifacts-dir", str(tmp_path)]):
        with pytest.raises(SystemExit) as exc:
            main(["bench", TINY_MODEL, *bad])
        assert exc.value.code == 2, bad
    capsys.readouterr()
    assert main(["bench", TINY_MODEL, "--artifacts", str(tmp_path), "--backends", "onnxruntim"]) == 2
    assert "did you mean onnxruntime" in capsys.readouterr().err
    assert main(["bench", "--all", TINY_MODEL]) == 2
    assert main(["bench", TINY_MODEL, "--artifacts", str(tmp_path), "--gemm-size", "32"]) == 2
    assert main(["bench", TINY_MODEL, "--artifacts", str(tmp_path), "--threads", "100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "--gemm-size" in err[1] and "--threads 100000" in err[2]


def test_cli_merges_backend_subsets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_tiny_build(tmp_path)
    base = ["bench", TINY_MODEL, "--artifacts", str(tmp_path), *FAST_ARGS, "--no-overhead", "--threads", "1"]
    assert main([*base, "--backends", "eager", "--batch-sizes", "1"]) == 0  # the backend: both eager artifacts
    assert main([*base, "--backends", "eager-bf16", "--batch-sizes", "2"]) == 0  # one artifact, another batch
    capsys.readouterr()
    cells = read_bench(tmp_path / TINY_MODEL / "b1")["cells"]
    assert sorted((c["label"], c["batch"]) for c in cells) == [("eager", 1), ("eager-bf16", 1), ("eager-bf16", 2)]


def test_cli_exit_code_3_when_some_cells_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _need("onnxruntime")
    make_tiny_build(tmp_path, static_onnx=True)
    assert main(["bench", TINY_MODEL, "--artifacts", str(tmp_path), "--batch-sizes", "1,3", *FAST_ARGS,
                 "--backends", "onnxruntime", "--no-overhead"]) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("exporter bench:")]
    assert len(errors) == 1 and errors[0].startswith("exporter bench: onnx-static at batch 3: failed")


def test_cuda_without_gpu_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    make_tiny_build(tmp_path)
    assert main(["bench", TINY_MODEL, "--artifacts", str(tmp_path), "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err


@pytest.mark.gpu
def test_cuda_events_path(tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    make_tiny_build(tmp_path)
    build = load_build(TINY_MODEL, tmp_path)
    results = bench.bench_build(build, BenchSettings(batch_sizes=(1,), device="cuda", **FAST), backends=["eager"],
                                save=False)
    cell = next(c for c in results["cells"] if c["artifact"] == "eager")
    assert cell["status"] == "ok" and cell["transfers"]["h2d_ms"] >= 0
    assert cell["memory"]["kind"].startswith("device-wide")


def test_peers_are_judged_then_timed_in_the_same_rounds_and_compared(own_build: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    build_dir = copy_build(own_build, tmp_path / "b")
    assert main(["verify", str(build_dir), "--samples", "16"]) == 0  # ours must have passed to be compared
    capsys.readouterr()
    code = main(["bench", str(build_dir), "--batch-sizes", "1", "--budget", "0.05", "--min-runs", "3", "--warmup",
                 "1", "--gemm-size", "256", "--peers", "--json"])
    out = capsys.readouterr()
    assert out.out.strip(), out.err[-2000:]
    results = json.loads(out.out)
    assert code in (0, 3)
    peers = {c["label"]: c for c in results["peers"]["cells"]}
    assert peers["peer:ort-default"]["parity"]["status"] == "pass" and peers["peer:ort-default"]["status"] == "ok"
    assert peers["peer:ort-default"]["options"] == {} and not any(c["label"].startswith("peer:")
                                                                  for c in results["cells"])
    assert {n["peer"] for n in results["peers"]["not_run"]} >= {"openvino-on-int8-onnx"}  # the build has no int8
    (row,) = results["peers"]["versus"]
    assert row["ratio"] == pytest.approx(row["ours_p50_ms"] / row["peer_p50_ms"]) and row["ours_parity"] == "pass"
    assert "peers" in read_bench(build_dir)
    assert all("bare_p50_ms" not in c for c in peers.values())  # our runner's overhead is timed for ours only
    assert any("bare_p50_ms" in c for c in results["cells"])
    from exporter.report import collect, model_markdown

    text = "\n".join(model_markdown(collect(load_build(str(build_dir))), None))
    assert "Against the runtimes' own defaults" in text and "| peer:ort-default |" in text
    if BACKENDS["openvino"].unavailable_reason("cpu") is None:
        default = peers["peer:openvino-default"]
        assert default["parity"]["judged_as"] == default["executed_precision"]  # judged in what it really ran
        assert (build_dir / "peers" / "nncf-default" / "model.xml").is_file()
        assert peers["peer:nncf-default-int8"]["parity"]["judged_as"] == "int8"
        from exporter.backends.base import PEERS

        artifacts = {a.name: a for a in load_build(str(build_dir)).artifacts}
        for name in ("openvino-f32", "openvino-default", "nncf-default-int8"):  # the file as it is: dynamic batch
            assert PEERS[name](build_dir, artifacts, lambda: None).options["static_shapes"] is False

