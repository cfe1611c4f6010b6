"""Capture: the step timer, the per-request trace, process sampling and routes."""
