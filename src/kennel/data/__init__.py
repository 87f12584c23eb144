"""Finding, splitting, decoding and storing images; never imports the model."""
