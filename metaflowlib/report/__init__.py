"""The reporting layer, above the core: the pages and figures a reader opens.

summary.py: the `report` stage's page (methods side by side, training curves, MAML memory, links to the
other stages' results); tta.py: the `tta_report` stage's TENT-style tables; learned_optimizer.py: the
`optimizer_eval` stage's tables and curves; render.py: what they share (table rows, memory column, PNGs).
"""
