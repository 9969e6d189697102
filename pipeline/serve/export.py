"""`kmax export`: a checkpoint's inference network as ONNX, TorchScript or an ExportedProgram, then checked.

The exported network is `kmax_model.inference.InferenceNetwork`: float32 pixel values ``[B, 3, H, W]`` in
[0, 255] -> ``class_probs [B, N, K+1]``, ``mask_probs [B, N, h, w]``, ``class_logits``, ``mask_logits``
(``h, w = ceil(H / 4), ceil(W / 4)``); the panoptic merge stays in Python (kmax_model.postprocess on the
logits, as evaluation runs it). Batch, height and width are dynamic in every format. Every export is
loaded back from disk (onnxruntime; ``torch.jit.load``; ``torch.export.load(...).module()``) and run on
`DEFAULT_CHECK_SHAPES` against the eager model (``model.forward`` on ``normalize_images``); the largest
absolute difference of each output is printed, and any above ``--tolerance`` fails the command (exit 1).
Next to the artefact, ``<artefact>.json`` records the input contract, the dynamic ranges, the classes and
the check. Export runs on the CPU.

How each format is made, and why:

- ``onnx``: ``torch.onnx.export(dynamo=False)``, the TorchScript-based exporter (opset `ONNX_OPSET`). The
  argmax one-hot of ``decoder.assignment=argmax`` becomes ArgMax + ScatterElements and every mode matches
  eager to ~1e-6 (measured up to 9e-7, cross_attention's mask logits). The dynamo exporter (``dynamo=True``,
  needs onnxscript) gives the same numbers but took 40-70 s per export on 2 cores against ~2 s (it runs
  torch.export's symbolic shape analysis, then its decompositions, then the translation), and its graph
  inherits torch.export's H, W >= 33 assumption (see below), which ONNX cannot check at run time. The
  TorchScript-based exporter is deprecated since torch 2.9 and still works in 2.13; when a torch release
  drops it, ``dynamo=True`` is the replacement.
- ``torchscript``: ``torch.jit.trace`` (scripting cannot read the model's Python). Shapes are traced as
  size ops, so the trace runs at any size.
- ``exported-program``: ``torch.export.export`` with dynamic batch, height and width, then
  ``run_decompositions({})`` (the inference IR): the training IR keeps each ``torch.autocast(enabled=False)``
  block of the model as a ``wrap_with_autocast`` node, which ``torch.export.load`` refuses (torch 2.13). Its
  ranges are what torch.export derived, written to the sidecar: H, W >= 33 for the kMaX models, because
  torch.export assumes a dynamic size is never 1 and the stride-32 map is ``ceil(H / 32)`` pixels high.

Both tracers see one Python branch: `kmax_model.layers.resize_bilinear` skips the resize when the sizes
already agree. The traces keep the resize, which at equal sizes with align_corners is an exact identity, so
they are right at every size; their TracerWarning about it is silenced.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kmax_model.config_utils import config_to_dict
from kmax_model.inference import (
    INPUT_CONTRACT,
    OUTPUT_CONTRACT,
    OUTPUT_NAMES,
    PAD_VALUE,
    SIZE_MULTIPLE,
    InferenceNetwork,
    reference_outputs,
)
from pipeline.cli import fail
from pipeline.storage import absolute, is_uri

FORMATS = ("onnx", "torchscript", "exported-program")
DEFAULT_TOLERANCE = 1e-3
"""Largest absolute difference allowed between an artefact's output and eager PyTorch's, for every output.
fp32 kernel reordering (onnxruntime's convolutions, einsum orders) moves outputs by ~1e-7 here; a wrong
export (a baked shape, a dropped op) moves probabilities and logits by 1e-2 and more. Trained mask logits
are O(10), so 1e-3 is ~1e-4 relative."""
ONNX_OPSET = 18
ONNX_REQUIREMENTS = ("onnx==1.23.2", "onnxruntime==1.32.0")
"""The ``export`` extra of pyproject.toml on Python 3.11+ (what ``--format onnx`` needs: onnxruntime runs
the check)."""
TRACE_SHAPE = (2, 73, 89)
"""(B, H, W) of the example input the network is traced with: batch > 1 and H != W so that torch.export
keeps all three dynamic (it specialises sizes 0/1 and unifies equal ones), and large enough that every
resize of the pixel decoder changes the size, so that the traces keep it (module docstring); 4k + 1 sizes,
as evaluated."""
DEFAULT_CHECK_SHAPES = ((2, 65, 97), (1, 129, 81))
"""(B, H, W) the artefact is checked at: two sizes and batches other than the traced one."""
CHECK_SEED = 0
PIXEL_LEVELS = 256
"""Check images are random integer pixel values 0..255, as decoded images hold."""
SIDECAR_SUFFIX = ".json"
PROGRAM_SUFFIX = ".pt2"
"""torch.export.save/load archives: other names are read, with a warning."""


@contextlib.contextmanager
def _quiet_tracing():
    """Silence what tracing is known to say about this model (see the module docstring): the TracerWarning
    of resize_bilinear's equal-size branch, the deprecation notices of the TorchScript-based tools (chosen
    knowingly, see the module docstring) and a FutureWarning torch.export raises from its own code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"kmax_model\.layers")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", message=r".*(legacy TorchScript-based ONNX|torch\.jit\.trace).*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*treespec, LeafSpec.*")
        yield


def _images(batch: int, height: int, width: int, seed: int | torch.Generator = CHECK_SEED) -> torch.Tensor:
    """Random integer pixel values ``[batch, 3, height, width]`` (float32), from ``seed`` or a generator."""
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    return torch.randint(0, PIXEL_LEVELS, (batch, 3, height, width), generator=generator).float()


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


# ---------------------------------------------------------------------------------------------- exporters


def _any_size() -> dict[str, list]:
    """Dynamic ranges [min, max or None] of a traced artefact: any batch and size."""
    return {"batch": [1, None], "height": [1, None], "width": [1, None]}


def export_onnx(network: InferenceNetwork, out: str) -> dict[str, list]:
    """Write ``network`` as ONNX (TorchScript-based exporter, dynamic B, H, W); returns the dynamic ranges."""
    grid = {0: "batch", 2: "grid_height", 3: "grid_width"}
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "class_probs": {0: "batch"}}
    axes.update({"class_logits": {0: "batch"}, "mask_probs": grid, "mask_logits": grid})
    with torch.no_grad(), _quiet_tracing():
        torch.onnx.export(
            network, (_images(*TRACE_SHAPE),), out, dynamo=False, input_names=["images"],
            output_names=list(OUTPUT_NAMES), dynamic_axes=axes, opset_version=ONNX_OPSET,
        )  # fmt: skip
    return _any_size()


def export_torchscript(network: InferenceNetwork, out: str) -> dict[str, list]:
    """Write ``network`` as a traced TorchScript module; returns the dynamic ranges."""
    with torch.no_grad(), _quiet_tracing():
        traced = torch.jit.trace(network, (_images(*TRACE_SHAPE),), check_trace=False)
        torch.jit.save(traced, out)
    return _any_size()


def export_program(network: InferenceNetwork, out: str) -> dict[str, list]:
    """Write ``network`` as a ``torch.export`` ExportedProgram (inference IR, dynamic B, H, W); returns the
    ranges torch.export derived."""
    dynamic = torch.export.Dim.DYNAMIC
    with torch.no_grad(), _quiet_tracing():
        program = torch.export.export(
            network, (_images(*TRACE_SHAPE),), dynamic_shapes={"images": {0: dynamic, 2: dynamic, 3: dynamic}}
        )
        program = program.run_decompositions({})
    torch.export.save(program, out)
    return program_ranges(program)


def program_ranges(program: torch.export.ExportedProgram) -> dict[str, list]:
    """[min, max or None] of the input's batch, height and width as the program accepts them. torch.export
    reports 2 as the lower bound of a dim it only assumed not to be 0 or 1, and accepts 1 at run time."""
    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    ranges = {}
    for key, dim in zip(("batch", "height", "width"), (0, 2, 3)):
        size = node.meta["val"].shape[dim]
        if not isinstance(size, torch.SymInt):
            ranges[key] = [int(size), int(size)]
            continue
        bounds = program.range_constraints[size.node.expr]
        lower, upper = float(bounds.lower), float(bounds.upper)  # sympy integers or torch's int_oo
        ranges[key] = [1 if lower == 2 else int(lower), None if math.isinf(upper) else int(upper)]
    return ranges


EXPORTERS: dict[str, Callable[[InferenceNetwork, str], dict[str, list]]] = {
    "onnx": export_onnx,
    "torchscript": export_torchscript,
    "exported-program": export_program,
}
EXPORTER_NAMES = {
    "onnx": f"torch.onnx.export (TorchScript-based, opset {ONNX_OPSET})",
    "torchscript": "torch.jit.trace",
    "exported-program": "torch.export.export + run_decompositions",
}


def load_artefact(fmt: str, path: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """The artefact at ``path`` read back as its consumers read it, as ``images -> outputs`` (CPU)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda x: tuple(
            torch.from_numpy(o) for o in session.run(list(OUTPUT_NAMES), {"images": x.numpy()})
        )
    with _quiet_tracing():
        module = (
            torch.jit.load(path, map_location="cpu")
            if fmt == "torchscript"
            else torch.export.load(path).module()
        )

    def call(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(module(images))

    return call


def check_artefact(
    run: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    model: torch.nn.Module,
    shapes: Sequence[tuple[int, int, int]] = DEFAULT_CHECK_SHAPES,
    seed: int = CHECK_SEED,
) -> list[dict[str, Any]]:
    """Run an artefact and the eager model on random images of each (B, H, W) in ``shapes``.

    Returns one ``{"shape": [B, 3, H, W], "max_abs_diff": {output name: float}}`` per shape (inf for an
    output of the wrong shape). Exceptions of the artefact propagate."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    for b, h, w in shapes:
        images = _images(b, h, w, generator)
        got, want = run(images), reference_outputs(model, images)
        if len(got) != len(OUTPUT_NAMES):
            raise ValueError(
                f"the artefact returned {len(got)} outputs, not the {len(OUTPUT_NAMES)} of {OUTPUT_NAMES}"
            )
        diffs = {}
        for name, g, r in zip(OUTPUT_NAMES, got, want):
            same = tuple(g.shape) == tuple(r.shape)
            diffs[name] = float((g.float() - r).abs().max()) if same else math.inf
        results.append({"shape": [b, 3, h, w], "max_abs_diff": diffs})
    return results


def check_failures(checks: Sequence[dict[str, Any]], tolerance: float) -> list[str]:
    """``"name at BxCxHxW: diff"`` for every output above ``tolerance`` (NaN counts as above)."""
    return [
        f"{name} at {_shape_text(c['shape'])}: {d:.3g}"
        for c in checks for name, d in c["max_abs_diff"].items() if not d <= tolerance
    ]  # fmt: skip


# --------------------------------------------------------------------------------------- checkpoint, classes


def load_network(checkpoint: str) -> tuple[InferenceNetwork, Any, dict[str, Any]]:
    """(eval-mode `InferenceNetwork`, ExperimentConfig, checkpoint dict) of a training checkpoint."""
    from kmax_model.model import build_model
    from pipeline.checkpoint import load_checkpoint
    from pipeline.config import ExperimentConfig

    state = load_checkpoint(checkpoint)
    cfg = ExperimentConfig.from_dict(state["config"])
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    return InferenceNetwork(model.eval()).eval(), cfg, state


def read_classes(cfg: Any, data: str | None, split: str | None) -> tuple[list[dict[str, Any]], dict | None]:
    """The classes ``[{class_id, name, category_id, isthing}]`` and the manifest they came from (or None).

    Names and dataset category ids come from the manifest of ``data`` (errors raise), else from the
    config's own prepared dataset when it is a local folder that still holds it with the model's class
    count; without a manifest they are None and ``isthing`` comes from ``data.thing_class_ids``."""
    from pipeline.data.records import read_manifest

    manifest = None
    if data is not None:
        manifest = read_manifest(data, split or cfg.data.val_split)
    elif cfg.data.prepared_dir and not is_uri(cfg.data.prepared_dir):
        with contextlib.suppress(FileNotFoundError, ValueError):
            manifest = read_manifest(cfg.data.prepared_dir, split or cfg.data.val_split)
    k = cfg.model.num_classes
    if manifest is not None and int(manifest["num_classes"]) != k:
        if data is not None:
            raise ValueError(f"{data} has {manifest['num_classes']} classes, the checkpoint's model {k}")
        manifest = None
    categories = {int(c["class_id"]): c for c in manifest["categories"]} if manifest else {}
    things = set(cfg.data.thing_class_ids)
    classes = []
    for i in range(k):
        c = categories.get(i)
        classes.append({
            "class_id": i, "name": c["name"] if c else None, "category_id": c["category_id"] if c else None,
            "isthing": bool(c["isthing"]) if c else i in things,
        })  # fmt: skip
    return classes, manifest


# ------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=absolute, required=True, help="training checkpoint (state.pt)")
    parser.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--out", type=absolute, required=True, help="artefact file (its sidecar: FILE.json)")
    parser.add_argument(
        "--tolerance", type=float, default=DEFAULT_TOLERANCE,
        help=f"largest absolute difference to eager PyTorch of any output (default {DEFAULT_TOLERANCE})",
    )  # fmt: skip
    shapes = [_shape_text(s) for s in DEFAULT_CHECK_SHAPES]
    parser.add_argument(
        "--check-shapes", nargs="+", metavar="BxHxW", default=shapes,
        help=f"batch x height x width of the check images (default: {' '.join(shapes)})",
    )  # fmt: skip
    parser.add_argument(
        "--data", type=absolute, help="prepared dataset whose manifest names the classes "
        "(default: the checkpoint's own, when it is still there)",
    )  # fmt: skip
    parser.add_argument(
        "--split", help="the split whose manifest names the classes (default: the checkpoint's val split)"
    )


def parse_shapes(texts: Sequence[str]) -> list[tuple[int, int, int]]:
    """``["2x65x97", ...]`` -> ``[(2, 65, 97), ...]``; ValueError naming a bad entry."""
    shapes = []
    for text in texts:
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text.strip())
        if not match or min(int(v) for v in match.groups()) < 1:
            raise ValueError(f"--check-shapes entry {text!r} is not BxHxW with positive integers")
        shapes.append(tuple(int(v) for v in match.groups()))
    return shapes


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags or the environment, or None."""
    if args.format not in FORMATS:
        return f"unknown --format {args.format!r}; choose one of {', '.join(FORMATS)}"
    if is_uri(args.out):
        return f"--out must be a local file, got {args.out}"
    if args.format == "exported-program" and not args.out.endswith(PROGRAM_SUFFIX):
        return f"--format exported-program writes a {PROGRAM_SUFFIX} archive: name --out FILE{PROGRAM_SUFFIX}"
    if not args.tolerance > 0:
        return f"--tolerance must be > 0, got {args.tolerance}"
    if args.format == "onnx":
        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            needs, pins = " and ".join(missing), " ".join(ONNX_REQUIREMENTS)
            return f"--format onnx needs {needs}: pip install {pins} (the project's export extra)"
    return None


def describe(ranges: dict[str, list], network: InferenceNetwork) -> list[str]:
    """The input contract of an artefact with its dynamic ranges, as printed."""
    n = network.model.transformer_decoder.cluster_centers.shape[0]
    k1 = network.model.predictor.class_head.out_channels
    span = {key: f">= {lo}" if hi is None else f"{lo}..{hi}" for key, (lo, hi) in ranges.items()}
    return [
        f"input   images float32 [B, 3, H, W], RGB pixel values 0..255 ({INPUT_CONTRACT['normalisation']}); "
        f"B {span['batch']}, H {span['height']}, W {span['width']}",
        f"        H, W = {SIZE_MULTIPLE}k + 1 as trained and evaluated: pad bottom/right with {PAD_VALUE}",
        f"outputs class_probs/class_logits [B, {n}, {k1}] (last class void), "
        f"mask_probs/mask_logits [B, {n}, ceil(H/4), ceil(W/4)] (softmax over the {n} slots)",
    ]


def sidecar(args, cfg, state, ranges, checks, classes, manifest) -> dict[str, Any]:
    """The JSON written next to the artefact."""
    contract = dict(INPUT_CONTRACT, dynamic=ranges)
    return {
        "format": args.format, "artefact": Path(args.out).name, "exporter": EXPORTER_NAMES[args.format],
        "torch": torch.__version__, "checkpoint": args.checkpoint, "step": int(state.get("step", 0)),
        "input": contract, "outputs": OUTPUT_CONTRACT, "num_slots": cfg.model.decoder.num_clusters,
        "num_classes": cfg.model.num_classes, "void_class_id": cfg.model.num_classes,
        "assignment": cfg.model.decoder.assignment, "classes": classes,
        "label_divisor": manifest["label_divisor"] if manifest else None,
        "postprocess": config_to_dict(cfg.model.postprocess),
        "check": {"tolerance": args.tolerance, "seed": CHECK_SEED, "results": checks},
    }  # fmt: skip


def _export_and_check(args, network, shapes) -> tuple[dict[str, list], list[dict[str, Any]], float]:
    """Export, read back and check; returns (dynamic ranges, checks, export seconds)."""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + SIDECAR_SUFFIX).unlink(missing_ok=True)  # no sidecar of an earlier export may outlive it
    start = time.perf_counter()
    ranges = EXPORTERS[args.format](network, args.out)
    seconds = time.perf_counter() - start
    checks = check_artefact(load_artefact(args.format, args.out), network.model, shapes)
    return ranges, checks, seconds


def _report(args, network, ranges, checks, seconds) -> None:
    size_mb = Path(args.out).stat().st_size / 2**20
    print(f"{args.format} ({EXPORTER_NAMES[args.format]}) -> {args.out} ({size_mb:.1f} MiB, {seconds:.1f} s)")
    print("\n".join(describe(ranges, network)))
    print(f"check against eager PyTorch, max |difference| (tolerance {args.tolerance:g}):")
    for c in checks:
        diffs = "  ".join(f"{name} {d:.2e}" for name, d in c["max_abs_diff"].items())
        print(f"  {_shape_text(c['shape']):<12} {diffs}")


def run(args: argparse.Namespace) -> int:
    problem = _usage_problem(args)
    if problem:
        return fail("export", problem)
    try:
        shapes = parse_shapes(args.check_shapes)
        network, cfg, state = load_network(args.checkpoint)
        classes, manifest = read_classes(cfg, args.data, args.split)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # RuntimeError: weights of another model
        return fail("export", _first_line(exc))
    try:
        ranges, checks, seconds = _export_and_check(args, network, shapes)
    except Exception as exc:  # the exporter or the artefact refusing the model: one line, exit 1
        fail("export", f"{args.format} export or its check failed: {type(exc).__name__}: {_first_line(exc)}")
        return 1
    _report(args, network, ranges, checks, seconds)
    record = sidecar(args, cfg, state, ranges, checks, classes, manifest)
    failures = check_failures(checks, args.tolerance)
    record["check"]["passed"] = not failures
    Path(args.out + SIDECAR_SUFFIX).write_text(json.dumps(_finite(record), indent=1))
    print(f"sidecar {args.out + SIDECAR_SUFFIX}")
    if failures:
        fail("export", f"check failed (tolerance {args.tolerance:g}): {'; '.join(failures)}")
        return 1
    return 0


def _finite(obj: Any) -> Any:
    """``obj`` with inf/NaN floats written as strings, so that the sidecar is strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return str(obj) if isinstance(obj, float) and not math.isfinite(obj) else obj


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""
