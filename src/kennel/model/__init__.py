"""The model: the torchvision backbone with a new head (``network``), its weights (``weights``), the model file
(``file``) and inference on arrays and files (``inference``). What the audit, training, evaluation, predict and serving
share; nothing here knows how a model is trained."""
