"""Evaluating trained checkpoints the way the paper does (docs/method.md §5).

evaluate.py   tokenratio eval: preference metrics, generation, diversity, win rates
metrics.py    entropy, self-BLEU, distinct-n, win rate, length-controlled win rate (pure)
judges.py     reward-model and OpenAI-compatible judges
explain.py    tokenratio explain: per-token credit as HTML and PNG
"""
