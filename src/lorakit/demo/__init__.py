"""The offline end-to-end demo and its small real model (SmolLM2 from PyPI)."""
