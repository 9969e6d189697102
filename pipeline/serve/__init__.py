"""Trained models in use: official weights imported, predictions on images, exported networks."""
