"""The MLflow UI view a sweep opens on: its trials side by side with PQ and what was swept.

MLflow's experiment page starts from a general view (in MLflow 3, the GenAI start page; a sweep's runs
collapsed under the parent, no metric columns). `save_sweep_view` writes, as experiment tags, what the UI
needs to open on the answer instead:

- ``mlflow.experimentKind = custom_model_development`` (also set when pipeline.tracking creates an
  experiment; here for stores made before): model training (runs table, charts), not a GenAI app;
- a shared view state, the mechanism behind the UI's own "Share" button: a JSON object in the tag
  ``mlflow.sharedViewState.<key>``, applied when the page is opened with ``?viewStateShareKey=<key>``. Ours
  selects the columns PQ / PQ_th / PQ_st, the swept parameters, the seed and the variant, and orders the
  runs by PQ, best first. A table ordered by a metric does not nest child runs under their parent (the
  UI nests only when ordered by start time), so every trial is a row of its own;
- the experiment description (``mlflow.note.content``, shown above the table): the study and a link to
  the comparison report, which the UI renders on the parent run's artifact page.

The key is a hash of the state, so saving the same view twice writes the same tag. Field names follow
MLflow 3.17's UI (`ExperimentPageSearchFacetsState` and `ExperimentPageUIState` in mlflow/server/js);
the UI merges them over its defaults, so a field it drops is ignored rather than an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pipeline.sweep.report import PQ_KEY, REFERENCE_PARAM, REPORT_ARTIFACT_DIR, SPACE_PARAM, sweep_parent
from pipeline.sweep.study import SEED_PATH
from pipeline.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND

SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
DESCRIPTION_TAG = "mlflow.note.content"
PQ_COLUMNS = (PQ_KEY, "eval/pq_things", "eval/pq_stuff")  # PQ, PQ_th, PQ_st
REPORT_FILE = f"{REPORT_ARTIFACT_DIR}/report.html"
COLUMN_WIDTH_PX = 150  # PQ to ten decimals; a swept value
VARIANT_WIDTH_PX = 280  # a variant of two swept fields, e.g. assignment=cluster_softmax,coord_conv=False
SEED_WIDTH_PX = 90


@dataclass(frozen=True)
class SweepView:
    """Where a sweep's view lives: ``path`` is the UI route (append it to the server's base URL)."""

    experiment_id: str
    parent_run_id: str
    share_key: str
    has_report: bool

    @property
    def path(self) -> str:
        query = f"workflowType=machine_learning&viewStateShareKey={self.share_key}"  # the sidebar's mode too
        return f"/#/experiments/{self.experiment_id}/runs?{query}"

    @property
    def report_path(self) -> str:
        """The parent run's artifact page with the report selected (rendered there in a frame)."""
        run = f"/#/experiments/{self.experiment_id}/runs/{self.parent_run_id}"
        return f"{run}/artifactPath/{REPORT_FILE}?workflowType=machine_learning"


def column(kind: str, key: str) -> str:
    """A column key as the UI spells it (its makeCanonicalSortKey): ``metrics.`eval/pq_all```."""
    return f"{kind}.`{key}`"


def view_state(swept: list[str]) -> dict:
    """The shared view state: search facets (order by PQ, every active run) and the selected columns."""
    # the run-name column is pinned and narrow, so the variant and seed come first in full
    variant, seed = column("tags", "variant"), column("params", SEED_PATH)
    columns = [variant, seed, *(column("metrics", k) for k in PQ_COLUMNS)]
    columns += [column("params", p) for p in swept]
    widths = {c: COLUMN_WIDTH_PX for c in columns} | {variant: VARIANT_WIDTH_PX, seed: SEED_WIDTH_PX}
    return {
        "searchFilter": "",
        "orderByKey": column("metrics", PQ_KEY),
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": widths,
        "viewMaximized": False,
        "runListHidden": False,
    }


def share_key(state: dict) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:32]


def _description(sweep: str, params: dict[str, str], report_path: str | None) -> str:
    """Markdown; the first line (all the collapsed header shows) carries the report link."""
    report = (
        f"[comparison report: CIs, paired verdicts, PQ curves]({report_path})"
        if report_path
        else f"no comparison report yet (`kmax compare --sweep {sweep}` writes it)"
    )
    return (
        f"**Sweep `{sweep}`**: {report}. Trials ordered by PQ at their last validation.\n\n"
        f"{params.get('seeds', '?')} seed(s) per variant of `{params.get(SPACE_PARAM, '?')}`; "
        f"reference variant `{params.get(REFERENCE_PARAM, '?')}`; the parent run `{sweep}` holds the report."
    )


def list_sweeps(tracking_uri: str) -> list[str]:
    """The names of the sweeps in the store (experiments ``sweep-<name>``), sorted."""
    from mlflow.tracking import MlflowClient

    experiments = MlflowClient(tracking_uri).search_experiments(filter_string="name LIKE 'sweep-%'")
    return sorted(e.name.removeprefix("sweep-") for e in experiments)


def save_sweep_view(tracking_uri: str, sweep: str) -> SweepView:
    """Write the sweep's view into its experiment's tags (see the module docstring) and return it.

    Raises ValueError naming the sweep and the store when the store holds no such sweep."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id, parent = sweep_parent(client, sweep, tracking_uri)
    swept = list(json.loads(parent.data.params.get(SPACE_PARAM, "{}")))
    state = view_state(swept)
    key = share_key(state)
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, REPORT_ARTIFACT_DIR)}
    view = SweepView(experiment_id, parent.info.run_id, key, REPORT_FILE in artifacts)
    description = _description(sweep, parent.data.params, view.report_path if view.has_report else None)
    for tag, value in {
        EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND,
        SHARED_VIEW_TAG_PREFIX + key: json.dumps(state),
        DESCRIPTION_TAG: description,
    }.items():
        client.set_experiment_tag(experiment_id, tag, value)
    return view
