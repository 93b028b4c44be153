"""The controlled frontier (DPO's sentiment experiment, arXiv 2305.18290 §6.1): preference pairs
sampled from the reference and labelled by a gold reward known exactly, so that a trained
policy's own samples can be scored by the same reward against their KL to the reference.

- gold.py: gold rewards, pluggable scorers of (prompt, response) batches;
- sampling.py: K samples a prompt from one prompt forward (its KV cache expanded to K rows);
- pairs.py: every pair of a prompt's K samples labelled by the gold reward, ties dropped and
  counted, written as an ordinary preference file, content-keyed and resumable.
"""
