"""Data sources, preparation into class-disjoint splits, and model preprocessing."""
