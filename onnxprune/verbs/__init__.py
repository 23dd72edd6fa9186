"""The verbs, one module each: inspect, evaluate (eval), score, allocate, apply, finetune, report. Each
takes paths or an AnalysedModel and returns a result type; onnxprune.api re-exports them."""
