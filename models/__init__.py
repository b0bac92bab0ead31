"""Task runners: a small common interface, one module per task, a registry keyed by the Hub pipeline tag.

This is the one place that loads weights. It never imports FastAPI or Ray.
"""
