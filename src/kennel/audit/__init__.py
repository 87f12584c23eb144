"""The data audit: near-copies of one photo (re-encoded, resized, cropped, mirrored) within and across splits,
labels the pretrained backbone's embeddings contradict, and images that belong to no class.

``cache`` keeps one vector per image sha1 (pooled backbone features, or a perceptual hash without pretrained
weights) so a grown dataset computes only its new images; ``neighbours`` finds each image's nearest neighbours and
the near-copies among them (or the hash pairs within a distance) and groups them; ``splits`` keeps each group in one
split; ``labels`` ranks every image for label review (cleanlab); ``outliers`` ranks every image by its distance to
every class; ``report``, ``figures`` and ``label_figures`` write what was found.
"""
