"""Decide: which received series are complete and which of them are segmented (rules, stacking)."""
