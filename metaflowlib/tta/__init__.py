"""Test-time adaptation: the strategies (`strategies/`: source, bn, tent, ttt), their few-shot use
(`fewshot`), the source classifiers they start from, shifted test sets and the benchmark (its report:
metaflowlib.report.tta; the served classifier: metaflowlib.serving.classifier).
"""
