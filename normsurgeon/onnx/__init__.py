"""ONNX work: export with verification, and folding / fusion passes on .onnx files."""
