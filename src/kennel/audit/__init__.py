"""A look at the data before training: what the pretrained backbone's embeddings say about the labels."""
