"""Reference networks (torch) for onnxprune: definitions, training on bundled data, ONNX export.

torch is needed here (extra ``onnxprune[torch]``); the onnxprune core never imports this package.
"""
