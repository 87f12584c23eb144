"""Scoring a model on the test split: metrics, figures, Grad-CAM, the reports the evaluate stage writes and the
run's description."""
