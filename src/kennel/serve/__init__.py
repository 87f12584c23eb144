"""The commands around the pipeline: ``kennel predict``, ``reproduce``, ``ui`` and ``lr-find``."""
