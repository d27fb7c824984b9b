"""Test-time adaptation: the strategies (`strategies/`: source, bn, tent, ttt), their few-shot use
(`fewshot`), the source classifiers they start from, shifted test sets, the benchmark and its report.
"""
