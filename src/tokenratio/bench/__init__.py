"""`tokenratio bench`: a token-level task whose optimal policies are known exactly, and how close each
loss gets to them.

    task.py         the token-level MDP: exact DP optima, occupancy metrics, pair sampling
    tabular.py      tabular policies through the real kernels; the one full-batch fit loop
    finite.py       the finite-data regime (sampled pairs, early stopping, lr grid, seeds)
    population.py   the exact population regime and the per-position controls
    transformer.py  the second policy class: a tiny transformer LM through the real scoring path
    report.py       one report writer and table formatter for every regime
    plots.py        frontier and training-curve PNGs

Nothing here imports the training pipeline (trainer, tisdpo).
"""
