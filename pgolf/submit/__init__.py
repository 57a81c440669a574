"""From runs to a Parameter Golf submission: `python -m pgolf.submit bundle|record ...`.

`bundle` writes one standalone train_gpt.py for a run; `record` writes a
records/track_10min_16mb/<date>_<name>/ folder from the runs of several seeds.
"""
