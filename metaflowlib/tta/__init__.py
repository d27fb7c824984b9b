"""Test-time adaptation as a benchmark: source classifiers, shifted test sets, the evaluation, the report.

The strategies themselves live in `metaflowlib.adaptation`; this package feeds
them registered models and corrupted data and measures error and cost.
"""
