"""Planning: model shape, memory and time model, device figures, fitting, measurement."""
