"""`tokenratio study`: the paper's comparison on a real model and real data, in one command.

config.py   StudyConfig ([study] of a training config) and loading with --set overrides
splits.py   disjoint train / validation / test files cut from the data, checked
runner.py   the grid: lr picked on validation (seed 0), other seeds, evaluation on test; resumable
report.py   report.md / report.json with 95% intervals over seeds, and the plots
"""
