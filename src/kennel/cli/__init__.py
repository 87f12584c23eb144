"""The commands around the pipeline (``python -m kennel COMMAND``): ``main.py`` dispatches, ``command.py`` holds what
they share, and each command has its module."""
