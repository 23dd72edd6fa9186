"""The artefacts' former home, kept for the import paths the README shows (``onnxprune.plan.write_json``)."""

from onnxprune.artefacts import Plan, Scores, load_plan, load_scores, write_json

__all__ = ["Plan", "Scores", "load_plan", "load_scores", "write_json"]
