"""The model without the training stack: ``onnx_export`` writes an ONNX file (fp32 or int8) and checks it against
the PyTorch model before it keeps it. Running such a file is the model room's (``kennel.model.onnx_inference``:
onnxruntime, no torch)."""
