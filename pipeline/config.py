"""`ExperimentConfig`: everything one training run needs, as nested typed dataclasses.

Sections: ``model`` (kmax_model `KMaXConfig`), ``data`` (prepared dataset, splits, batch sizes,
augmentation `AugmentConfig`), ``train`` (optimiser, schedule, precision, cadence),
``scaling`` (Ray Train workers), ``fault`` (restarts), ``tracking`` (MLflow), ``ray`` (how to reach
Ray), ``run_dir``. Loaded from a preset name or a YAML file, then dotted ``--set`` overrides
(``train.lr=1e-3``) through kmax_model.config_utils; errors name the dotted field.

The dataset decides ``model.num_classes`` and ``data.thing_class_ids``: `bind_manifest` copies them
from the prepared manifest, so a config never disagrees with its data.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kmax_model.config import KMaXConfig, preset
from kmax_model.config_utils import apply_overrides, config_from_dict, config_to_dict, load_yaml
from pipeline.ray_setup import RayConfig
from pipeline.storage import absolute, join

Precision = Literal["fp32", "bf16", "fp16"]
SQLITE_PREFIX = "sqlite:///"


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass
class AugmentConfig:
    """Training augmentation and targets; crop_size is (height, width) (an int means a square).

    ``crowd_as_ignore`` (deeplab2's ``treat_crowd_as_ignore``, default True as both references train):
    crowd pixels are in no mask and ignored by the mask losses. False makes each crowd region one more
    mask of its class, so the model is told what covers those pixels. The official PQ does not remove a
    predicted segment's crowd pixels from its IoU, so a thing next to a crowd region is scored with
    whatever the unsupervised crowd pixels got (the COCO sample's ball beside a person crowd: IoU 0.45
    with crowd ignored); a segment predicted on the crowd region itself is ignored, not a false positive.
    """

    crop_size: tuple[int, int] | int = (97, 97)
    min_scale: float = 0.5
    max_scale: float = 1.5
    flip_prob: float = 0.5
    output_stride: int = 4
    seed: int = 0
    crowd_as_ignore: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.crop_size, int):
            self.crop_size = (self.crop_size, self.crop_size)
        self.crop_size = tuple(int(v) for v in self.crop_size)
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(f"augment.crop_size must be (height, width) > 0, got {self.crop_size}")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(
                f"augment.min_scale/max_scale must satisfy 0 < min_scale <= max_scale, got "
                f"{self.min_scale}, {self.max_scale}"
            )
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"augment.flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.output_stride < 1:
            raise ValueError(f"augment.output_stride must be >= 1, got {self.output_stride}")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Target grid ``ceil(crop / stride)`` per side."""
        s = self.output_stride
        return (-(-self.crop_size[0] // s), -(-self.crop_size[1] // s))


@dataclass
class DataConfig:
    """Where the data is and how it is batched.

    Attributes:
        prepared_dir: output of ``kmax prepare`` (holds one folder per split); None = generate the
            synthetic dataset into ``<run_dir>/data`` on first use.
        train_split / val_split: split names inside ``prepared_dir``.
        batch_size: images per worker per micro-batch (global batch = batch_size x workers x grad_accum).
        eval_batch_size: images per worker per evaluation batch.
        eval_size: (H, W) every image is padded to for evaluation (a larger image is refused); None = each
            image padded to the smallest ``4k + 1`` size holding it (pipeline.eval.predictor). A model
            with global attention sees the padding, so evaluating at the training canvas can score higher:
            the COCO-sample overfit model gave PQ 80.7 dynamic and 82.2 at its 433 x 641 crop.
        eval_long_side: resize each image (bilinear, aspect ratio kept) so its long side has this many pixels
            before padding, and its mask logits back to the stored size before the panoptic merge (PQ is
            scored at the stored resolution); None = as stored. The references evaluate COCO so, at the
            training resolution (long side resized to the 1281 crop); match it to the augment's scale.
        augment: training-time augmentation (pipeline.data.augment).
        thing_class_ids: contiguous ids of thing classes; set from the manifest by `bind_manifest`.
        num_vis_images: validation images drawn in the prediction grid artifact.
        min_epoch_rows: a training split with fewer records is repeated inside one data epoch (each copy
            augmented differently) up to at least this many rows, so that a small split still gives every
            worker several units to shuffle (pipeline.train.data_order).
        shuffle_window: training rows a worker permutes together inside its share of an epoch, after the
            split's row groups are permuted across workers (pipeline.train.data_order); 0 = the stored
            order, no shuffle.
        synthetic_train / synthetic_val / synthetic_size / synthetic_seed: the synthetic dataset made when
            prepared_dir is None (its own seed: replicates over ``train.seed`` train on the same data).
    """

    prepared_dir: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 8
    eval_batch_size: int = 8
    eval_size: tuple[int, int] | None = None
    eval_long_side: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    thing_class_ids: tuple[int, ...] = ()
    num_vis_images: int = 4
    min_epoch_rows: int = 512
    shuffle_window: int = 256
    synthetic_train: int = 96
    synthetic_val: int = 24
    synthetic_size: int = 96
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        positive = ("batch_size", "eval_batch_size", "min_epoch_rows")
        for name in (*positive, "synthetic_train", "synthetic_val", "synthetic_size"):
            _require(getattr(self, name) > 0, f"data.{name} must be > 0, got {getattr(self, name)}")
        _require(self.num_vis_images >= 0, f"data.num_vis_images must be >= 0, got {self.num_vis_images}")
        _require(
            bool(self.train_split and self.val_split), "data.train_split and data.val_split must be non-empty"
        )
        if self.eval_long_side is not None:
            _require(self.eval_long_side > 0, f"data.eval_long_side must be > 0, got {self.eval_long_side}")
        if self.eval_size is not None:
            _require(
                all(s > 0 for s in self.eval_size), f"data.eval_size must be positive, got {self.eval_size}"
            )


@dataclass
class TrainConfig:
    """Optimisation and cadence. Intervals count optimiser steps; 0 disables periodic eval/checkpoints
    (a final evaluation and checkpoint are always made). ``grad_clip_norm``: clip the global L2 norm of all
    gradients to this value before each optimiser step, 0 = off (bytedance/kmax-deeplab's "full_model"
    clipping, ``torch.nn.utils.clip_grad_norm_`` over every parameter; its released configs leave it off,
    reference_kmax.md §5). The norm before clipping is logged as ``train/grad_norm`` either way."""

    steps: int = 2000
    lr: float = 5e-4
    backbone_lr_multiplier: float = 0.1
    weight_decay: float = 0.05
    adam_eps: float = 1e-7
    warmup_steps: int = 100
    warmup_start: float = 0.001
    poly_power: float = 0.9
    grad_accum: int = 1
    grad_clip_norm: float = 0.0
    precision: Precision = "fp32"
    seed: int = 0
    eval_interval: int = 500
    checkpoint_interval: int = 500
    log_interval: int = 10
    num_to_keep: int = 2
    vis_interval: int = 0

    def __post_init__(self) -> None:
        _require(self.steps > 0, f"train.steps must be > 0, got {self.steps}")
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _require(self.backbone_lr_multiplier >= 0, "train.backbone_lr_multiplier must be >= 0")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.adam_eps > 0, f"train.adam_eps must be > 0, got {self.adam_eps}")
        _require(
            0 <= self.warmup_steps < self.steps,
            f"train.warmup_steps must be in [0, train.steps), got {self.warmup_steps}",
        )
        _require(
            0 <= self.warmup_start <= 1, f"train.warmup_start must be in [0, 1], got {self.warmup_start}"
        )
        _require(self.poly_power >= 0, f"train.poly_power must be >= 0, got {self.poly_power}")
        _require(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _require(self.grad_clip_norm >= 0, f"train.grad_clip_norm must be >= 0, got {self.grad_clip_norm}")
        for name in ("eval_interval", "checkpoint_interval", "vis_interval"):
            _require(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _require(self.log_interval >= 1, f"train.log_interval must be >= 1, got {self.log_interval}")
        _require(self.num_to_keep >= 1, f"train.num_to_keep must be >= 1, got {self.num_to_keep}")


@dataclass
class ScalingSection:
    """Ray Train workers. ``cpus_per_worker`` may be fractional so that Ray Data tasks are not starved on
    small machines (shared/docs/reference_ray_mlflow.md §4)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, f"scaling.num_workers must be >= 1, got {self.num_workers}")
        _require(self.cpus_per_worker > 0, f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        _require(self.gpus_per_worker > 0, f"scaling.gpus_per_worker must be > 0, got {self.gpus_per_worker}")

    def resources_per_worker(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res


@dataclass
class FaultConfig:
    """``max_failures``: worker-group restarts (from the latest checkpoint) before the run fails."""

    max_failures: int = 2

    def __post_init__(self) -> None:
        _require(
            self.max_failures >= -1,
            f"fault.max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}",
        )


@dataclass
class TrackingConfig:
    """MLflow. ``uri`` None = embedded SQLite store + artifact folder inside the run directory.
    ``final_flush_s``: how long the end of a run waits for an unreachable store before leaving the rest of
    its metrics to the journal (pipeline.train.forwarder)."""

    uri: str | None = None
    experiment_name: str = "kmax-train"
    run_name: str | None = None
    final_flush_s: float = 30.0

    def __post_init__(self) -> None:
        _require(self.final_flush_s >= 0, f"tracking.final_flush_s must be >= 0, got {self.final_flush_s}")


@dataclass
class ExperimentConfig:
    """One training run.

    ``run_dir``: the run's local directory on the driver (the embedded MLflow store, progress lines).
    ``storage``: where everything that outlives a process or must be seen by another node goes
    (pipeline.storage: a shared mount path or ``s3://bucket/prefix``); the run then lives under
    ``<storage>/<run_dir's name>`` (`run_location`). None: everything in ``run_dir``, as on one machine.
    """

    model: KMaXConfig = field(default_factory=lambda: preset("tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    fault: FaultConfig = field(default_factory=FaultConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    run_dir: str = "runs/train"
    storage: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.run_dir), "run_dir must be non-empty")
        _require(self.storage is None or bool(self.storage), "storage must be non-empty when given")
        if self.train.precision != "fp32" and not self.scaling.use_gpu:
            raise ValueError(
                f"train.precision={self.train.precision} needs scaling.use_gpu=true (CPU trains in fp32)"
            )

    @property
    def run_location(self) -> str:
        """Where the run's persistent state lives: checkpoints (``ray_results``), ``best``, the metrics
        journal, ``config.yaml``, the MLflow run record (a path or a storage URI)."""
        if self.storage is None:
            return self.run_dir
        return join(self.storage, os.path.basename(os.path.normpath(self.run_dir)))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        return config_from_dict(cls, data)


def _tiny_experiment() -> ExperimentConfig:
    """The CPU recipe: tiny model on the synthetic 96 px dataset (97 px crops), a high lr for a small model,
    two single-threaded DDP workers (4 images each, global batch 8).

    Why two workers of one thread rather than one of two threads (benchmarks/bench_train.py, 97 px crops,
    4 images per worker): intra-op threads do not pay at these tensor sizes (1 thread 13.6 img/s, 2 threads
    11.9 img/s in a plain loop), while two processes use both cores (19.3 img/s, 1.64x the 2-thread worker).
    lr 1e-2 with 97 px crops: lr 2e-3 with 65 px crops stayed at PQ 0 after 400 steps (masks never got
    confident); val PQ 74.0 after 200 steps with this lr and batch on one worker."""
    return ExperimentConfig(
        model=preset("tiny"),
        data=DataConfig(batch_size=4, eval_batch_size=8),
        scaling=ScalingSection(num_workers=2, cpus_per_worker=1.0),
        train=TrainConfig(
            steps=1000,
            lr=1e-2,
            backbone_lr_multiplier=1.0,
            warmup_steps=30,
            eval_interval=200,
            checkpoint_interval=200,
            log_interval=10,
        ),
    )


def experiment_preset(name: str) -> ExperimentConfig:
    """An experiment for a model preset. ``tiny`` has a CPU recipe; the others use the released COCO
    recipe (reference_kmax.md §5: lr 5e-4, backbone x0.1, decay 0.05, warmup 5000, 150k steps)."""
    if name == "tiny":
        return _tiny_experiment()
    model = preset(name)
    return ExperimentConfig(
        model=model,
        train=TrainConfig(
            steps=150_000, lr=5e-4, warmup_steps=5000, eval_interval=5000, checkpoint_interval=5000
        ),
    )


PATH_FIELDS = (
    "run_dir", "storage", "data.prepared_dir", "model.backbone.pretrained", "model.init_from"
)  # fmt: skip
"""Config fields that are file-system paths: made absolute on the driver (`with_absolute_paths`), because
Ray workers and tasks run in other directories."""


def with_fields(cfg: ExperimentConfig, values: Mapping[str, Any]) -> ExperimentConfig:
    """``cfg`` with typed values set at dotted paths (``{"data.prepared_dir": "/d"}``), validated once."""
    return apply_overrides(cfg, values) if values else cfg


def field_value(cfg: Any, path: str) -> Any:
    """The value at a dotted path of a config."""
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def with_absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Every `PATH_FIELDS` path and a relative SQLite tracking URI made absolute (before Ray starts)."""
    values: dict[str, Any] = {}
    for path in PATH_FIELDS:
        value = field_value(cfg, path)
        if value and absolute(value) != value:
            values[path] = absolute(value)
    uri = cfg.tracking.uri or ""
    if uri.startswith(SQLITE_PREFIX) and not uri.startswith(SQLITE_PREFIX + "/"):
        values["tracking.uri"] = SQLITE_PREFIX + absolute(uri[len(SQLITE_PREFIX) :])
    return with_fields(cfg, values)


def load_experiment(config: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """``config`` is a preset name or a YAML file (a partial nested mapping over the defaults)."""
    if config.endswith((".yaml", ".yml")) or Path(config).is_file():
        cfg = load_yaml(ExperimentConfig, config)
    else:
        cfg = experiment_preset(config)
    return apply_overrides(cfg, overrides or [])


def bind_manifest(cfg: ExperimentConfig, manifest: dict) -> ExperimentConfig:
    """Take ``num_classes`` and thing classes from a prepared split's manifest."""
    model = dataclasses.replace(cfg.model, num_classes=int(manifest["num_classes"]))
    things = tuple(int(c) for c in manifest["thing_class_ids"])
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, thing_class_ids=things))
