"""The diffusion math, model-agnostic: schedules, denoisers, samplers."""
