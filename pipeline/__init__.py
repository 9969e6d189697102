"""Data, training, evaluation and tracking of kMaX models on Ray and MLflow."""
