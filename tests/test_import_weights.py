"""``kmax import-weights``: an official checkpoint file -> a kmax checkpoint that evaluation loads.

The round trip writes a fake official file (random tensors in the layout of
../shared/fixtures/kmax_official_keys/cityscapes_r50.json, ``{"model": state_dict}``), imports it through
the CLI, and loads the result with `predictor_from_checkpoint`, the function ``kmax evaluate --checkpoint``
uses; the loaded model's tensors must be the converted ones and it must predict.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess

import numpy as np
import pytest
import torch

from kmax_model import preset
from pipeline.checkpoint import load_checkpoint
from pipeline.cli import main
from pipeline.data.cityscapes import manifest_categories
from pipeline.data.records import SCHEMA_VERSION
from pipeline.eval.predictor import predictor_from_checkpoint
from pipeline.serve.import_weights import imported_config, official_state_dict, read_official
from tests.test_convert import PD, SEM, TD, official_fixture, random_official_state

PRESET = "resnet50_cityscapes"
CITYSCAPES_LABEL_DIVISOR = 1000


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def official_state() -> dict[str, torch.Tensor]:
    return random_official_state(official_fixture(PRESET)["keys"], seed=5)


def _prepared_manifest(root, num_classes: int = 19) -> None:
    """A prepared ``val`` split's manifest (no shards: the predictor reads only the categories)."""
    split = root / "val"
    split.mkdir(parents=True)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "num_classes": num_classes,
        "label_divisor": CITYSCAPES_LABEL_DIVISOR,
        "categories": manifest_categories(),
    }
    (split / "manifest.json").write_text(json.dumps(manifest))


def test_cli_round_trip_loads_through_the_evaluation_path(tmp_path, official_state, capsys):
    weights = tmp_path / "kmax_r50_cityscapes.pth"
    torch.save({"model": official_state, "iteration": 59999}, weights)
    out = tmp_path / "imported"
    argv = ["import-weights", "--weights", str(weights), "--preset", PRESET, "--out", str(out)]
    small = ["--set", "data.eval_size=null", "--set", "data.eval_long_side=null"]  # a 65 x 129 image here
    assert main(argv + small) == 0
    assert f"wrote {out / 'state.pt'}: {PRESET}" in capsys.readouterr().out

    state = load_checkpoint(out)
    assert state["step"] == 0 and state["optimizer"] is None
    assert state["source"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert state["source"]["file"] == str(weights) and state["source"]["preset"] == PRESET

    data = tmp_path / "prepared"
    _prepared_manifest(data)
    predict, cfg = predictor_from_checkpoint(out, data, "val")
    assert cfg.model.pixel_decoder == preset(PRESET).pixel_decoder
    assert cfg.model.postprocess.stuff_area_limit == 0 and cfg.model.postprocess.resize_align_corners
    ours = predict.model.state_dict()
    theirs = official_state
    torch.testing.assert_close(
        ours["transformer_decoder.cluster_centers"], theirs[TD + "_cluster_centers.weight"].T
    )
    torch.testing.assert_close(ours["backbone.layer3.5.conv2.weight"], theirs["backbone.res4.5.conv2.weight"])
    torch.testing.assert_close(ours["backbone.layer1.0.downsample.1.running_var"],
                               theirs["backbone.res2.0.shortcut.norm.running_var"])  # fmt: skip
    torch.testing.assert_close(
        ours["pixel_decoder.fuses.2.skip_norm.weight"], theirs[PD + "_in_norms.3.weight"]
    )
    torch.testing.assert_close(ours["semantic_head.head.2.bias"], theirs[SEM + "2.conv.bias"])
    image = np.random.default_rng(0).integers(0, 256, (65, 129, 3), dtype=np.uint8)
    (prediction,) = predict([{"height": 65, "width": 129, "image": image}])
    assert prediction["label_map"].shape == (65, 129)


def test_tf_ported_pickle_of_numpy_arrays_reads_without_counters(tmp_path, official_state):
    """convert-tf-weights-to-d2.py writes {"model": {key: ndarray}, "__author__": ...} with pickle and no
    num_batches_tracked entries; a DDP "module." prefix is stripped too."""
    arrays = {
        "module." + k: v.numpy() for k, v in official_state.items() if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "kmax_r50_cityscapes.pkl"
    path.write_bytes(
        pickle.dumps({"model": arrays, "__author__": "third_party", "matching_heuristics": True})
    )
    state = official_state_dict(read_official(path), path)
    assert len(state) == len(arrays) and all(isinstance(v, torch.Tensor) for v in state.values())
    key = TD + "_kmax_transformer_layers.3._query_qkv_conv_bn.norm.running_mean"
    assert torch.equal(state[key], official_state[key])


def test_reference_evaluation_is_stored_with_the_weights():
    coco = imported_config("convnext_tiny_coco", ["data.eval_batch_size=2"])
    assert coco.data.eval_long_side == 1281 and coco.data.eval_size == (1281, 1281)
    assert coco.data.eval_batch_size == 2 and coco.model == imported_config("convnext_tiny_coco", []).model
    assert coco.model.postprocess.thing_area_limit == 0 and coco.model.postprocess.resize_align_corners
    city = imported_config(PRESET, [])
    assert city.data.eval_size == (1025, 2049) and city.model.num_classes == 19


def test_bad_inputs_give_one_line_naming_the_file_or_key(tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    partial = tmp_path / "partial.pth"
    stem = torch.zeros(64, 3, 7, 7)
    torch.save({"model": {"backbone.stem.conv1.weight": stem, "extra.key": torch.zeros(1)}}, partial)
    unsafe = tmp_path / "unsafe.pkl"
    # a global no checkpoint should hold (not print: once Ray is imported, print pickles as Ray's own)
    unsafe.write_bytes(pickle.dumps({"model": {"x": subprocess.Popen}}))
    cases = [
        (garbage, "resnet50_coco", "garbage.pth cannot be read with torch.load(weights_only=True)"),
        (partial, "resnet50_coco", "keys of theirs no rule converts (1): extra.key"),
        (partial, "resnet50_coco", "keys of ours missing from theirs"),
        (unsafe, "resnet50_coco", "refusing to load subprocess.Popen"),
        (tmp_path / "absent.pth", "resnet50_coco", "absent.pth does not exist"),
    ]
    for weights, name, expected in cases:
        argv = ["import-weights", "--weights", str(weights), "--preset", name, "--out", str(tmp_path / "o")]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("kmax import-weights: ") and expected in err and "\n" not in err
    argv = ["import-weights", "--weights", str(partial), "--preset", "resnet50_coco", "--out", "x/model.pth"]
    assert main(argv) == 2
    assert "give a folder or a path ending in /state.pt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
