"""The ONNX side: the model and explain-graph contracts, variants and their self-checks,
sessions."""
