"""Live Jupyter dashboards: one per chapter, sharing :class:`~moewidgets.dashboards.runner.LiveRunner`.

Importing this package imports ipywidgets and bokeh (``import moewidgets`` alone never does).
"""
from .chapter1 import Chapter1Dashboard
from .chapter2 import Chapter2Dashboard
from .chapter2_lm import Chapter2LMDashboard
from .chapter3 import Chapter3Dashboard
from .chapter4 import Chapter4Dashboard
from .runner import LiveRunner, RunState, RunTimings, describe_run

__all__ = ["Chapter1Dashboard", "Chapter2Dashboard", "Chapter2LMDashboard", "Chapter3Dashboard", "Chapter4Dashboard", "LiveRunner", "RunState", "RunTimings", "describe_run"]
