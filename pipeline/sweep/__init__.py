"""Ablation sweeps: studies, the Ray Tune driver, the comparison report and the dashboard."""
