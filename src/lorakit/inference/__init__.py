"""Inference: the Predictor (a run's stored template, always) and batched / streaming decoding."""
