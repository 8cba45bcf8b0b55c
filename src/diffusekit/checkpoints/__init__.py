"""Files <-> modules: single-file and diffusers checkpoints, detection, inspection."""
