"""Evaluations: generation-based accuracy (more to come: likelihood, alignment drift)."""
