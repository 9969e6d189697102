"""`kmax sweep`: an ablation study as a Ray Tune sweep, one Ray Train run per trial, tracked in MLflow.

    kmax sweep --study assignment [--config tiny] [--set train.steps=300 ...] [--seeds N]
               [--run-dir runs/sweeps/assignment] [--tracking-uri URI] [--ray-address auto] [--resume]
               [--asha [--grace-evals 1] [--reduction-factor 2]]
               [--until-decided [--max-seeds 10] [--margin 0.5] [--alpha 0.05] [--budget 40gpu-h]]

The driver builds the base config once and every trial's config once (base + the study's fixed overrides +
the trial's point, as typed values), checks them all before any compute, and hands Tune a param space over
the study's dotted config paths (``model.decoder.assignment``, ``train.seed``): Tune runs exactly the
pending points (``points_to_evaluate``), names each trial by its key, and its ResultGrid has a column per
swept path. Each trial is a light driver of one Ray Train run (pipeline.sweep.trial).

Sweep directory layout::

    <sweep_dir>/mlflow.db, mlartifacts/        the embedded MLflow store (unless --tracking-uri)
    <sweep_dir>/mlflow_run.json                the parent run of the sweep
    <sweep_dir>/data/prepared                  the synthetic dataset shared by the trials, when none is given
    <sweep_dir>/trials/<trial_key>/            one training run directory per trial (fit's layout)
    <sweep_dir>/trials/<trial_key>/trial_done.json   written when the trial finished (resume bookkeeping)
    <sweep_dir>/tune/tune-<study>/<trial_key>/ Ray Tune's own state and results

Trial keys are deterministic (variant name + seed), so ``--resume`` skips every trial whose
``trial_done.json`` exists and re-runs only the missing or failed ones (an interrupted trial resumes from
its latest checkpoint because its run directory is the same). MLflow: one parent run per sweep (tags
``study``, ``sweep``) and one child run per trial (tags ``mlflow.parentRunId``, ``study``, ``trial``,
``variant``, ``seed``, ``overrides``), with the model's parameter count logged as ``model/parameters``.

Until decided (``--until-decided``): rounds of `run_sweep` on the same sweep, each adding a seed where a
comparison with the reference is still open (pipeline.sweep.until_decided).

Early stopping (``--asha``, pipeline.sweep.asha): a stopped trial is finished, not failed: its MLflow run is
closed FINISHED with the tag ``early_stopped=true`` and its ``trial_done.json`` written, so the report shows
it and ``--resume`` keeps it.

Concurrency (why trials cannot starve each other): a trial needs ``DRIVER_CPUS`` for its Tune driver plus
what its training run needs (pipeline.ray_setup.run_cpu_need); `max_concurrent_trials` = floor(cluster CPUs
/ that need), at least 1, so every running trial can always get its workers and its data tasks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import ExperimentConfig, load_experiment, with_absolute_paths, with_fields
from pipeline.sweep.asha import AshaConfig
from pipeline.sweep.study import SEED_PATH, Study, default_sweep_dir, resolve_study, trial_key, variant_name
from pipeline.sweep.trial import TrialBook, TrialSpec, close_stopped_trials, run_trial
from pipeline.train.run_log import open_channel

DRIVER_CPUS = 0.25
"""Logical CPUs reserved for each trial's driver function (it only waits on the TorchTrainer)."""
POLL_S = 0.5
"""Seconds between two drains of the trials' lines."""


def max_concurrent_trials(cluster_cpus: float, need: float) -> int:
    """floor(cluster_cpus / need) trials, at least 1; ValueError when even one cannot fit (it would wait
    forever for its workers). ``need``: one trial's CPUs (pipeline.ray_setup.run_cpu_need)."""
    if need > cluster_cpus + 1e-9:
        raise ValueError(
            f"one trial needs {need:g} CPUs (its driver, workers and data tasks) but the cluster has "
            f"{cluster_cpus:g}; lower scaling.num_workers / scaling.cpus_per_worker or add nodes"
        )
    return max(1, math.floor(cluster_cpus / need + 1e-9))


@dataclass
class SweepSummary:
    sweep_dir: str
    tracking_uri: str
    parent_run_id: str
    finished: list[str] = field(default_factory=list)  # trial keys run (and finished) by this call
    skipped: list[str] = field(default_factory=list)  # already finished before this call (resume)
    failed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)  # stopped early by ASHA (also in `finished`)
    specs: dict[str, TrialSpec] = field(default_factory=dict)  # every trial's config, as planned
    results: Any = None  # Tune's ResultGrid of the trials run by this call (None when none ran)
    wall_s: float = 0.0


def plan_trials(study: Study, sweep: SweepSetup, tracking_uri: str) -> dict[str, TrialSpec]:
    """Every trial's `TrialSpec`: its config = base + fixed overrides + point + where it lives, applied once
    (validated here, before any compute). The MLflow parent run id is added to the tags once it exists."""
    specs: dict[str, TrialSpec] = {}
    trials_storage = storage.join(sweep.location, "trials") if sweep.base.storage else None
    for point in study.trials():
        key = trial_key(point, study)
        cfg = with_fields(sweep.base, {
            **point,
            "run_dir": str(sweep.sweep_dir / "trials" / key),
            "storage": trials_storage,  # the trial lives under <sweep location>/trials/<key>
            "tracking.uri": tracking_uri,
            "tracking.experiment_name": f"sweep-{study.name}",
            "tracking.run_name": key,
        })  # fmt: skip
        tags = {
            "study": study.name, "trial": key,
            "variant": variant_name(point, study), "seed": str(point[SEED_PATH]),
            "overrides": json.dumps({p: point[p] for p in (*study.space, SEED_PATH)}, default=str),
        }  # fmt: skip
        specs[key] = TrialSpec(key, point, cfg, tags)
    return specs


@dataclass
class SweepSetup:
    """The sweep-wide decisions: its local directory (the embedded MLflow store, the report) and its
    location (everything persistent: ``<storage>/<sweep dir's name>``, or the directory itself without
    storage), the base config every trial starts from, whether that base's dataset is the synthetic one to
    make, early stopping, the Ray cluster to join."""

    sweep_dir: Path
    location: str
    base: ExperimentConfig
    synthetic: bool
    asha: AshaConfig | None = None
    ray_address: str | None = None


def setup_sweep(base: ExperimentConfig, sweep_dir, asha: AshaConfig | None, ray_address) -> SweepSetup:
    """Absolute paths and storage (``KMAX_STORAGE`` when the config names none), the shared synthetic
    dataset when none is given (else the given one is checked here, before Ray starts), and (ASHA) a
    checkpoint report at every validation."""
    from pipeline.train.driver import bind_data

    sweep_dir = Path(sweep_dir).resolve()
    if base.storage is None and os.environ.get(storage.STORAGE_VARIABLE):
        base = with_fields(base, {"storage": os.environ[storage.STORAGE_VARIABLE]})
    base = with_absolute_paths(base)
    location = storage.join(base.storage, sweep_dir.name) if base.storage else str(sweep_dir)
    synthetic = base.data.prepared_dir is None
    fields: dict[str, Any] = {}
    if synthetic:
        fields["data.prepared_dir"] = storage.join(location, "data", "prepared")
    else:
        bind_data(base)
    if asha is not None:
        asha.scheduler(base.train.steps, base.train.eval_interval)  # validates eval_interval first
        fields["train.checkpoint_interval"] = base.train.eval_interval
    return SweepSetup(sweep_dir, location, with_fields(base, fields), synthetic, asha, ray_address)


def _parent_run(study: Study, location: str, target, base: ExperimentConfig):
    """The sweep's MLflow parent run (created, or resumed with --resume; recorded under its location)."""
    from pipeline import tracking

    experiment = f"sweep-{study.name}"
    tracking.get_or_create_experiment(target, experiment)  # artifact location inside the sweep dir
    tags = {"study": study.name, "sweep": study.name, "kind": "sweep"}
    parent_id, _ = tracking.start_or_resume_run(target, experiment, location, study.name, tags=tags)
    parent = tracking.RunLogger(target.tracking_uri, parent_id)
    if not parent.has_params():
        space = json.dumps(study.space, default=str)
        reference = variant_name(study.reference_point(), study)  # the report's default comparison
        parent.log_params(
            {"study": study.name, "seeds": study.seeds, "space": space, "fixed": str(study.fixed),
             "reference": reference}
        )  # fmt: skip
        parent.log_dict(base.to_dict(), "base_config.json")
    return parent


def _tuner(book: TrialBook, pending: list[TrialSpec], location: str, concurrent: int, scheduler):
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipeline.train.driver import ray_storage

    study = book.study
    space: dict[str, Any] = {path: tune.choice(list(values)) for path, values in study.space.items()}
    space[SEED_PATH] = tune.choice(list(range(study.seeds)))
    name = lambda trial: trial_key(trial.config, study)  # noqa: E731
    return tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, book=book), {"CPU": DRIVER_CPUS}),
        param_space=space,
        tune_config=tune.TuneConfig(
            num_samples=len(pending),
            # the limit goes on the generator: Tune ignores max_concurrent_trials (with a warning) when
            # given a search algorithm that is not a Searcher, and then starts every trial at once
            search_alg=BasicVariantGenerator(
                points_to_evaluate=[dict(s.point) for s in pending], max_concurrent=concurrent
            ),
            scheduler=scheduler,
            trial_name_creator=name,
            trial_dirname_creator=name,
        ),
        run_config=tune.RunConfig(
            name=f"tune-{study.name}",
            **ray_storage(storage.join(location, "tune")),
            verbose=0,  # progress comes from the trials (TrialLines)
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[JsonLoggerCallback()],  # Tune's result table (ResultGrid.get_dataframe) reads it
        ),
    )


def _connect(sweep: SweepSetup, tracking_uri: str):
    """Start or join Ray; on a cluster of several nodes, refuse (one line, before any compute) a sweep
    without storage or with a tracking store that only this machine reaches."""
    from pipeline.ray_setup import RayConfig, init_ray, run_cpu_need, with_local_cpus
    from pipeline.train.driver import refuse_shared_nothing_without_storage

    sc = sweep.base.scaling
    need = run_cpu_need(sc.num_workers, sc.cpus_per_worker, DRIVER_CPUS)
    ray = init_ray(with_local_cpus(RayConfig(address=sweep.ray_address), need))
    refuse_shared_nothing_without_storage(sweep.base, ray)
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    if nodes > 1 and not tracking_uri.startswith(("http://", "https://")):
        raise ValueError(
            f"a sweep on a cluster of {nodes} nodes runs its trials on any node: it needs an MLflow tracking "
            "server that every node reaches (--tracking-uri http://<head>:5000; cluster.yaml starts one)"
        )
    return ray, need


def _reachable_from_every_node(target, ray):
    """A tracking server given as 127.0.0.1 / localhost on a cluster of several nodes is this node's: the
    trials on the other nodes reach it at this node's address, when it listens there (cluster.yaml's server
    listens on every interface). One bound to loopback only keeps its URI (all nodes on this machine)."""
    from urllib.parse import urlparse

    from pipeline.tracking import TrackingError, TrackingTarget, check_tracking_uri

    url = urlparse(target.tracking_uri)
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    if nodes == 1 or url.hostname not in ("127.0.0.1", "localhost"):
        return target
    here = url._replace(netloc=f"{ray.util.get_node_ip_address()}:{url.port}").geturl()
    try:
        check_tracking_uri(here, timeout_s=2)
    except TrackingError:
        return target
    return TrackingTarget(here, target.artifact_location)


class TrialLines(threading.Thread):
    """Prints the lines the trials put on the sweep's channel (a trial's own output stays on its node)."""

    def __init__(self, channel, echo):
        super().__init__(daemon=True, name="trial-lines")
        self.channel, self.echo, self.stop = channel, echo, threading.Event()

    def run(self) -> None:
        import ray

        while not self.stop.wait(POLL_S):
            for event in ray.get(self.channel.take.remote()):
                self.echo(event["text"])
        for event in ray.get(self.channel.take.remote()):
            self.echo(event["text"])


def _run_pending(book: TrialBook, pending: list[TrialSpec], sweep: SweepSetup, ray, need: float, echo):
    """Make the shared synthetic data if needed, run the pending trials on Tune, print their lines."""
    base, asha = sweep.base, sweep.asha
    if sweep.synthetic:
        from pipeline.data.synthetic import ensure_synthetic

        ensure_synthetic(storage.join(sweep.location, "data"), base.data, echo)
    cpus = float(ray.cluster_resources().get("CPU", 0))
    concurrent = max_concurrent_trials(cpus, need)
    echo(f"sweep {book.study.name}: {len(pending)} trial(s) to run, {concurrent} at a time on {cpus:g} CPUs")
    scheduler = asha.scheduler(base.train.steps, base.train.eval_interval) if asha else None
    printer = TrialLines(book.lines, echo)
    printer.start()
    try:
        return _tuner(book, pending, sweep.location, concurrent, scheduler).fit()
    finally:
        printer.stop.set()
        printer.join()


def run_sweep(
    study: Study,
    sweep_dir: str | Path,
    base: ExperimentConfig,
    *,
    tracking_uri: str | None = None,
    resume: bool = False,
    ray_address: str | None = None,
    asha: AshaConfig | None = None,
    hooks: Sequence = (),
    echo=print,
) -> SweepSummary:
    """Run (or with ``resume`` continue) ``study`` from the ``base`` config; see the module docstring.

    ``asha``: early stopping on validation PQ (None: every trial runs to the end). ``hooks``: step hooks run
    in every training worker of every trial (pipeline.train.worker.StepHook)."""
    from pipeline import tracking

    t0 = time.time()
    sweep = setup_sweep(base, sweep_dir, asha, ray_address)
    if storage.is_file(storage.join(sweep.location, tracking.RUN_ID_FILE)) and not resume:
        raise ValueError(
            f"{sweep.location} already holds a sweep; pass --resume to continue it or another --run-dir"
        )
    target = tracking.resolve_target(tracking_uri, sweep.sweep_dir)
    tracking.check_tracking_uri(target.tracking_uri)
    plan_trials(study, sweep, target.tracking_uri)  # every trial's config valid before Ray starts
    ray, need = _connect(sweep, target.tracking_uri)
    target = _reachable_from_every_node(target, ray)
    specs = plan_trials(study, sweep, target.tracking_uri)
    parent = _parent_run(study, sweep.location, target, sweep.base)
    for spec in specs.values():
        spec.tags["mlflow.parentRunId"] = parent.run_id
    summary = SweepSummary(sweep.location, target.tracking_uri, parent.run_id, specs=specs)
    summary.skipped = [k for k, s in specs.items() if s.done()]
    pending = [s for s in specs.values() if not s.done()]
    if summary.skipped:
        echo(f"resume: {len(summary.skipped)} finished trial(s) kept: {', '.join(summary.skipped)}")
    if pending:
        lines = open_channel()
        credentials = tracking.credential_env()
        book = TrialBook(study, specs, target, asha is not None, tuple(hooks), lines, credentials)
        summary.results = _run_pending(book, pending, sweep, ray, need, echo)
        if asha is not None:
            summary.stopped = close_stopped_trials(summary.results, book, echo)
    for spec in pending:
        (summary.finished if spec.done() else summary.failed).append(spec.key)
    finished = len(summary.finished) + len(summary.skipped)
    parent.set_tags({"trials_finished": str(finished), "trials_total": str(len(specs))})
    parent.finish("FAILED" if summary.failed else "FINISHED")
    summary.wall_s = time.time() - t0
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.cli import add_config_arguments, add_run_arguments
    from pipeline.sweep import until_decided

    parser.add_argument("--study", required=True, help="study name in ablations.studies, or module:function")
    add_config_arguments(parser, what="every trial")
    add_run_arguments(parser, run_dir_help="runs/sweeps/<study>")
    parser.add_argument(
        "--seeds", type=int, default=None, help="replicates per variant (default: the study's)"
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join ('auto' under `ray submit`; default: a local Ray)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the sweep: run only unfinished trials"
    )
    parser.add_argument("--asha", action="store_true", help="stop trials early on validation PQ (Tune ASHA)")
    parser.add_argument("--grace-evals", type=int, default=1, help="ASHA: validations before any stop")
    parser.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep the best 1/this per rung")
    until_decided.add_arguments(parser)  # --until-decided, --max-seeds, --margin, --alpha, --budget


def run(args: argparse.Namespace) -> int:
    from functools import partial

    from pipeline.cli import fail, run_fields
    from pipeline.sweep import until_decided
    from pipeline.tracking import TrackingError

    address = args.ray_address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    try:
        study = resolve_study(args.study, seeds=args.seeds)
        asha = AshaConfig(args.grace_evals, args.reduction_factor) if args.asha else None
        fields = {k: v for k, v in run_fields(args).items() if k != "run_dir"}
        base = with_fields(load_experiment(args.config, args.overrides), fields)
        sweep_dir = args.run_dir or default_sweep_dir(study.name)
        echo = lambda m: print(m, flush=True)  # noqa: E731
        decided = until_decided.from_args(args, study, base, address)  # None: a fixed sweep
        runner = partial(run_sweep, asha=asha)
        if decided is not None:  # rounds of run_sweep, seeds added where a comparison is open
            rounds = until_decided.Rounds(run_sweep, setup_sweep)
            runner = partial(until_decided.run_until_decided, cfg=decided, rounds=rounds)
        s = runner(
            study, sweep_dir, base, tracking_uri=args.tracking_uri, resume=args.resume,
            ray_address=address, echo=echo,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, TrackingError) as exc:
        return fail("sweep", exc)
    print(
        f"sweep {study.name}: {len(s.finished)} trial(s) run ({len(s.stopped)} stopped early), "
        f"{len(s.skipped)} kept, {len(s.failed)} failed in {s.wall_s / 60:.1f} min\n"
        f"  MLflow: {s.tracking_uri} parent run {s.parent_run_id}\n"
        f"  compare: kmax compare --sweep {study.name} --run-dir {s.sweep_dir}"
    )
    if s.failed:
        print(f"failed trials: {', '.join(s.failed)}; rerun with --resume", file=sys.stderr)
        return 1
    return 0
