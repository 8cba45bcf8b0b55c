"""Evaluation: reading shapes back from pixels and GenEval-style prompt adherence."""
