"""Animations: keyframe schedules, prompt/seed travel, 2D motion, AnimateDiff, video files."""
