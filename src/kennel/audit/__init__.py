"""The data audit: near-copies of one photo (re-encoded, resized, cropped, mirrored) within and across splits, and
labels the pretrained backbone's embeddings contradict.

``cache`` keeps one vector per image sha1 (pooled backbone features, or a perceptual hash without pretrained
weights) so a grown dataset computes only its new images; ``neighbours`` finds the pairs above a threshold and
groups them; ``splits`` keeps each group in one split; ``labels`` ranks suspected label errors (cleanlab);
``report``, ``figures`` and ``label_figures`` write what was found.
"""
