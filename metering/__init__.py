"""Metering: phase timings, exact pricing, charges, the durable spool and ledger, usage sinks.

Pure Python: never imports Ray, torch or FastAPI.
"""
