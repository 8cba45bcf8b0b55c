"""Training: the loop, the objectives, and the recipe for the default model."""
