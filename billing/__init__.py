"""Billing policy: accounts, tokens, tiers, included credits, bill-to organizations, spending limits, admission.

Pure Python: never imports Ray, torch or FastAPI.
"""
