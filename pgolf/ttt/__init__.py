"""Eval-time additions that read the validation stream: the token-only n-gram tilt (ngram.py)."""
