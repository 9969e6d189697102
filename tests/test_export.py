"""`kmax export`: every format read back as its consumers read it (onnxruntime, torch.jit.load,
torch.export.load) and compared with eager PyTorch at two image sizes and batch sizes other than the traced
ones; every assignment mode through ONNX; the command's artefact, sidecar, exit codes and one-line errors.

The tiny preset's weights are randomised beyond their initialisation (every norm's scale, shift and running
statistics): deeplab2 initialises the last BN scale of each residual branch at 0, so a freshly built model
ignores its centre updates, and the assignment mode would change nothing that the comparison could see.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from torch import nn

from kmax_model import apply_overrides, build_model
from kmax_model.config import ASSIGNMENT_MODES
from kmax_model.inference import OUTPUT_NAMES, InferenceNetwork, reference_outputs
from pipeline.checkpoint import build_state, save_checkpoint
from pipeline.cli import main
from pipeline.config import experiment_preset
from pipeline.data.records import MANIFEST_NAME, SCHEMA_VERSION
from pipeline.serve import export
from tests.conftest import REPO

SHAPES = ((2, 65, 97), (1, 129, 81))
"""(B, H, W) of the checks: 4k + 1 sizes, neither the traced (2, 73, 89) nor square."""
ONNX_TOLERANCE = 1e-4
"""onnxruntime's kernels sum in other orders than torch's: measured <= 6e-6 on these weights and sizes."""
TORCH_TOLERANCE = 1e-6
"""TorchScript and the ExportedProgram run torch's own kernels: measured 0.0."""


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random scales (0.5..1.5), shifts and running statistics for every norm layer (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _config(assignment: str = "argmax"):
    cfg = experiment_preset("tiny")
    model = apply_overrides(cfg.model, {"decoder.assignment": assignment})
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, thing_class_ids=(0, 1)))


def _network(assignment: str = "argmax") -> InferenceNetwork:
    torch.manual_seed(0)
    return InferenceNetwork(_randomise(build_model(_config(assignment).model)).eval()).eval()


def _images(b: int, h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), generator=torch.Generator().manual_seed(1)).float()


def _assert_close(checks: list[dict], tolerance: float) -> None:
    assert [c["shape"] for c in checks] == [[b, 3, h, w] for b, h, w in SHAPES]
    for c in checks:
        assert set(c["max_abs_diff"]) == set(OUTPUT_NAMES)
        assert max(c["max_abs_diff"].values()) <= tolerance, c


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint in the project's format (randomised weights, argmax assignment)."""
    cfg = _config()
    model = _network().model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
    state = build_state(
        step=5, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, config=cfg.to_dict()
    )
    directory = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(directory, state)
    return directory / "state.pt"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared dataset's manifest naming the tiny model's 8 classes (nothing else of the dataset)."""
    root = tmp_path_factory.mktemp("data")
    (root / "val").mkdir()
    categories = [
        {"class_id": i, "category_id": 10 + i, "name": f"class{i}", "isthing": int(i < 2)} for i in range(8)
    ]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "num_classes": 8,
        "label_divisor": 1000,
        "categories": categories,
    }
    (root / "val" / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


# ------------------------------------------------------------------------------------------ the network


def test_inference_network_is_the_models_eval_path_bit_for_bit():
    net = _network()
    k1, n = (
        net.model.predictor.class_head.out_channels,
        net.model.transformer_decoder.cluster_centers.shape[0],
    )
    for b, h, w in SHAPES:
        images = _images(b, h, w)
        with torch.no_grad():
            got = net(images)
        want = reference_outputs(net.model, images)
        assert all(torch.equal(g, r) for g, r in zip(got, want))
        assert got[0].shape == got[2].shape == (b, n, k1)
        assert got[1].shape == got[3].shape == (b, n, (h + 3) // 4, (w + 3) // 4)
        assert torch.allclose(got[0].sum(-1), torch.ones(b, n)) and torch.allclose(
            got[1].sum(1), torch.ones(1)
        )


def test_randomised_weights_make_the_assignment_mode_visible():
    """argmax and spatial_softmax models have the same parameters (same seed); only the mode differs."""
    images = _images(1, 65, 97)
    with torch.no_grad():
        a, s = _network("argmax")(images)[3], _network("spatial_softmax")(images)[3]
    assert (a - s).abs().max() > 1e-2


# -------------------------------------------------------------------------------------------- the formats


@pytest.mark.parametrize("assignment", ASSIGNMENT_MODES)
def test_onnx_matches_eager_in_every_assignment_mode(assignment, tmp_path):
    import onnx

    net, out = _network(assignment), str(tmp_path / "m.onnx")
    assert export.export_onnx(net, out) == {"batch": [1, None], "height": [1, None], "width": [1, None]}
    graph = onnx.load(out).graph
    onnx.checker.check_model(out)
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
    checks = export.check_artefact(export.load_artefact("onnx", out), net.model, SHAPES)
    print(assignment, json.dumps(checks))
    _assert_close(checks, ONNX_TOLERANCE)


def test_torchscript_matches_eager_at_two_sizes(tmp_path):
    net, out = _network("cluster_softmax"), str(tmp_path / "m.torchscript")
    export.export_torchscript(net, out)
    checks = export.check_artefact(export.load_artefact("torchscript", out), net.model, SHAPES)
    print(json.dumps(checks))
    _assert_close(checks, TORCH_TOLERANCE)


@pytest.mark.slow
def test_exported_program_matches_eager_and_states_its_size_range(tmp_path):
    """torch.export assumes a dynamic size is never 1, so the stride-32 map (ceil(H / 32)) needs H >= 33:
    the program says so in its ranges and refuses smaller inputs by name. Slow: torch.export's symbolic
    shape analysis, the decompositions and the load take ~35 s of one core for the tiny model."""
    net, out = _network(), str(tmp_path / "m.pt2")
    ranges = export.export_program(net, out)
    assert ranges == {"batch": [1, None], "height": [33, None], "width": [33, None]}
    run = export.load_artefact("exported-program", out)
    checks = export.check_artefact(run, net.model, SHAPES)
    print(json.dumps(checks))
    _assert_close(checks, TORCH_TOLERANCE)
    with pytest.raises(Exception, match=">= 33"):
        run(_images(1, 17, 97))


# ----------------------------------------------------------------------------------------------- the command


def test_command_writes_the_artefact_and_its_sidecar(checkpoint, prepared, tmp_path, capsys):
    out = tmp_path / "export" / "kmax.onnx"
    argv = ["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]
    assert main([*argv, "--data", str(prepared)]) == 0
    printed = capsys.readouterr().out
    assert "images float32 [B, 3, H, W]" in printed and "B >= 1, H >= 1, W >= 1" in printed
    assert "2x3x65x97" in printed and "1x3x129x81" in printed and "mask_logits" in printed
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["format"] == "onnx" and side["artefact"] == "kmax.onnx" and side["step"] == 5
    assert side["input"]["dtype"] == "float32" and side["input"]["range"] == [0.0, 255.0]
    assert side["input"]["dynamic"] == {"batch": [1, None], "height": [1, None], "width": [1, None]}
    assert (side["num_classes"], side["void_class_id"], side["num_slots"]) == (8, 8, 32)
    assert side["classes"][1] == {"class_id": 1, "name": "class1", "category_id": 11, "isthing": True}
    assert side["label_divisor"] == 1000 and side["assignment"] == "argmax"
    check = side["check"]
    assert check["passed"] and check["tolerance"] == export.DEFAULT_TOLERANCE
    assert [c["shape"] for c in check["results"]] == [[2, 3, 65, 97], [1, 3, 129, 81]]
    assert max(d for c in check["results"] for d in c["max_abs_diff"].values()) <= ONNX_TOLERANCE


def test_command_fails_a_check_above_the_tolerance(checkpoint, tmp_path, capsys):
    out = tmp_path / "kmax.onnx"
    argv = ["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]
    assert main([*argv, "--tolerance", "1e-12", "--check-shapes", "1x33x41"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kmax export: check failed (tolerance 1e-12): ") and "\n" not in err
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["check"]["passed"] is False and side["classes"][0]["name"] is None
    assert side["classes"][0]["isthing"] and not side["classes"][2]["isthing"]  # config's thing_class_ids


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--checkpoint", "{missing}", "--format", "onnx"], "no checkpoint at"),
        (
            ["--format", "tflite"],
            "unknown --format 'tflite'; choose one of onnx, torchscript, exported-program",
        ),
        (["--format", "exported-program"], "writes a .pt2 archive"),
        (["--format", "torchscript", "--tolerance", "0"], "--tolerance must be > 0"),
        (["--format", "torchscript", "--check-shapes", "65x97"], "'65x97' is not BxHxW"),
        (["--format", "onnx", "--data", "{missing}"], "no prepared split 'val'"),
        (
            ["--format", "onnx", "--no-onnxruntime"],
            "needs onnxruntime: pip install onnx==1.23.2 onnxruntime==",
        ),
    ],
    ids=[
        "missing-checkpoint",
        "unknown-format",
        "program-suffix",
        "tolerance",
        "check-shapes",
        "missing-data",
        "missing-onnxruntime",
    ],  # fmt: skip
)
def test_bad_input_is_one_line_and_exit_2(flags, message, checkpoint, tmp_path, capsys, monkeypatch):
    if "--no-onnxruntime" in flags:
        flags = [f for f in flags if f != "--no-onnxruntime"]
        find_spec = export.importlib.util.find_spec
        monkeypatch.setattr(
            export.importlib.util,
            "find_spec",
            lambda name: None if name == "onnxruntime" else find_spec(name),
        )
    flags = [f.replace("{missing}", str(tmp_path / "missing")) for f in flags]
    base = [] if "--checkpoint" in flags else ["--checkpoint", str(checkpoint)]
    assert main(["export", *base, "--out", str(tmp_path / "m.bin"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kmax export: ") and message in err and "\n" not in err
    assert not (tmp_path / "m.bin").exists()


def test_the_export_extra_pins_what_the_command_asks_for():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    here = [
        str(r).split(";")[0]
        for r in map(Requirement, extras["export"])
        if not r.marker or r.marker.evaluate()
    ]
    assert sorted(here) == sorted(export.ONNX_REQUIREMENTS)
    assert "kmax-ray[export]" in extras["dev"]
