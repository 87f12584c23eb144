"""kennel: a reproducible transfer-learning pipeline for image classification."""

__version__ = "0.1.0"
