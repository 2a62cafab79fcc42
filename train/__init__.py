"""Flat training scripts (`python -m train.sam`, `python -m train.demo`) and what they share (`train.common`)."""
