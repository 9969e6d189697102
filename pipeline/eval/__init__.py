"""Evaluation: exact PQ, mIoU and mask AP, the predictor of a checkpoint, dataset evaluation, figures."""
