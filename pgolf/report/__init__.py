"""Seed-aware comparison of Hydra sweeps against a baseline with the challenge's record rule.

    python -m pgolf.report multirun/2026-03-20_12-00-00 [more dirs] --baseline optimizer.muon_weight_decay=0

    from pgolf.report import load_jobs, summarize, write_report
    report = summarize(load_jobs(["multirun/A", "multirun/B"]), baseline="optimizer.muon_weight_decay=0")
"""

from pgolf.report.jobs import Job, load_jobs, read_job
from pgolf.report.render import format_text, write_report
from pgolf.report.summary import compare, compare_frontier, group_key, summarize

__all__ = ["Job", "compare", "compare_frontier", "format_text", "group_key", "load_jobs", "read_job", "summarize", "write_report"]
