"""Billing policy: accounts, tokens, tiers, included credits, bill-to organizations, limits, admission.

Pure Python: never imports Ray, torch or FastAPI.
"""
