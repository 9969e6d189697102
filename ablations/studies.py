"""The named ablation studies of the decoder's centre update (k-means clustering and its controls).

Each function returns a `pipeline.sweep.study.Study`: a grid over dotted config paths, replicated over
seeds. Add a study by writing one more function here (or in your own module and passing
``--study mymodule:myfunction``). A study that names its reference (the baseline every other variant is
compared with) can also run ``--until-decided`` (pipeline.sweep.until_decided); the references named here
are the grids' first variants, the reports' default, so naming them changes no report.
"""

from __future__ import annotations

from kmax_model.config import CONTROLLED_ASSIGNMENT_MODES
from pipeline.sweep.study import Study

ASSIGNMENT = "model.decoder.assignment"
COORD_CONV = "model.decoder.coord_conv"
DEPTH = "model.decoder.blocks_per_stride"

DEPTHS = [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
CMT_SWITCHES = tuple(
    f"model.decoder.cmt.{name}"
    for name in ("centre_update", "residual_assignment", "pixel_update", "reference_mask")
)
MASK_APPROX_WEIGHT = "model.loss.mask_approx_weight"
DEFAULT_SEEDS = 3
"""Replicates per variant unless ``--seeds`` says otherwise: a PQ difference needs 3-5 runs to be told from
seed noise (the Mask2Former maintainers, facebookresearch/Mask2Former#5), and the report's paired t
intervals need at least 2 (pipeline.sweep.seed_stats)."""
DESIGNS = ["argmax", "cmt", "cross_attention"]


def assignment(seeds: int = DEFAULT_SEEDS) -> Study:
    """The controlled axis: one affinity (centres x pixels), three normalisations of it: kMaX's argmax
    over clusters, a softmax over clusters (with its pixel update), a softmax over pixels. Not whole designs:
    neither softmax mode is CMT-DeepLab or the standard cross-attention (``cross_attention``)."""
    space = {ASSIGNMENT: list(CONTROLLED_ASSIGNMENT_MODES)}
    return Study("assignment", space, seeds=seeds, reference={ASSIGNMENT: "argmax"})


def coord_conv(seeds: int = DEFAULT_SEEDS) -> Study:
    """Coordinate convolution (our formulation of the location-sensitive clustering idea of CMT-DeepLab)
    off vs on."""
    return Study("coord_conv", {COORD_CONV: [False, True]}, seeds=seeds, reference={COORD_CONV: False})


def decoder_depth(seeds: int = DEFAULT_SEEDS) -> Study:
    """kMaX decoder blocks per stride (32, 16, 8): 3, 6 or 9 layers."""
    return Study("decoder_depth", {DEPTH: DEPTHS}, seeds=seeds)


def full(seeds: int = DEFAULT_SEEDS) -> Study:
    """The full factorial of the three ablations (3 x 2 x 3 = 18 variants)."""
    space = {ASSIGNMENT: list(CONTROLLED_ASSIGNMENT_MODES), COORD_CONV: [False, True], DEPTH: DEPTHS}
    return Study("full", space, seeds=seeds)


def design(seeds: int = DEFAULT_SEEDS) -> Study:
    """Whole designs of the decoder layer, the question the product exists for: kMaX-DeepLab (k-means with
    argmax assignment, the reference), CMT-DeepLab as reconstructed (kmax_model.cmt: cross-attention plus
    its clustering components), and the standard multi-head cross-attention (kmax_model.cross_attention)."""
    return Study("design", {ASSIGNMENT: DESIGNS}, seeds=seeds, reference={ASSIGNMENT: "argmax"})


def cmt_components(seeds: int = DEFAULT_SEEDS) -> Study:
    """CMT-DeepLab as reconstructed (``decoder.assignment=cmt``, kmax_model.cmt): the full factorial of its
    four layer components on/off (16 variants; the reference is every component on). All off is the
    ``cross_attention`` layer; the mask-approximation loss is `cmt_mask_approx`."""
    return Study(
        "cmt_components",
        {path: [True, False] for path in CMT_SWITCHES},
        seeds=seeds,
        fixed={ASSIGNMENT: "cmt"},
        reference=dict.fromkeys(CMT_SWITCHES, True),
    )


def cmt_mask_approx(seeds: int = DEFAULT_SEEDS) -> Study:
    """CMT as reconstructed, every layer component on: the mask-approximation loss on (weight 1) vs off."""
    space = {MASK_APPROX_WEIGHT: [1.0, 0.0]}
    reference = {MASK_APPROX_WEIGHT: 1.0}
    return Study("cmt_mask_approx", space, seeds=seeds, fixed={ASSIGNMENT: "cmt"}, reference=reference)
