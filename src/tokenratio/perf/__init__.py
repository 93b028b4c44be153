"""`tokenratio perf`: the trainer's own step, timed side by side with TRL's.

harness.py   rows in alternation, medians, MFU, ratios; perf.json and perf.txt
worker.py    one row in its own process (`python -m tokenratio.perf.worker JSON`)
models.py    random-weight model shapes and synthetic token batches
"""
