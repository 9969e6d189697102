"""kMaX-DeepLab / CMT-DeepLab mask transformers in plain PyTorch (no Ray, no MLflow)."""
