"""What a compressed model is once it leaves training: its ONNX export, ONNX Runtime evaluation and latency,
and evaluating a recipe end to end. Imports neither Ray nor MLflow, so it is used and tested as it is."""
