"""Recovery after pruning (needs torch, the ``onnxprune[torch]`` extra): the ONNX graph as a trainable torch
module (convert.py), fine-tuning / distillation / BatchNorm recalibration (finetune.py), and the trained
weights written back into the same ONNX graph."""
