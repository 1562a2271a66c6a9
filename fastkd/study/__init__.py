"""python -m fastkd.study: every method under every seed with one budget, then accuracy and flatness compared.

One concern per module: `cli` (the command line), `plan` (which runs), `runs` (training and skipping them),
`measure` (each run's flatness), `aggregate` (the statistics over seeds), `report` (results.md and the figures).
The names below are the study's public ones, importable from fastkd.study as before the split.
"""
from .aggregate import METRICS, PAIRS, aggregate, interval_curves, run_fields, study_pairs
from .cli import build_parser, main
from .measure import ANALYSIS_CHUNK, PROFILE_POINTS, analyse_run, analysis_batches, analysis_settings
from .plan import EQUAL_STEPS, OFFICIAL, UNSPACED, StudyRun, parse_intervals, run_configs
from .report import curve_markdown, write_markdown, write_plots
from .runs import RESULT, RESULT_VERSION, run_study, train_run

__all__ = ["ANALYSIS_CHUNK", "EQUAL_STEPS", "METRICS", "OFFICIAL", "PAIRS", "PROFILE_POINTS", "RESULT",
           "RESULT_VERSION", "UNSPACED", "StudyRun", "aggregate", "analyse_run", "analysis_batches",
           "analysis_settings", "build_parser", "curve_markdown", "interval_curves", "main", "parse_intervals",
           "run_configs", "run_fields", "run_study", "study_pairs", "train_run", "write_markdown", "write_plots"]
