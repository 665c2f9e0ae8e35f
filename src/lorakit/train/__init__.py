"""Training: the recipe (setup -> train -> save), its arguments, callbacks, generation-based
validation and data-parallel launch."""
