"""Named ablation studies and the scripts users run (sweep, compare)."""
