# Generated from metrion_fixture/runtime/_async/__init__.py by .ci/unasync.py: edit that file, not this one.
"""The sync driver and store calls, generated from ``_async``."""
