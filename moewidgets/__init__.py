"""moewidgets: an interactive lab and an executable course on the geometry of Mixture-of-Experts layers.

``import moewidgets`` stays light: it never imports ipywidgets, bokeh or Jupyter (dashboards live in
``moewidgets.dashboards`` and import those on demand).
"""
from .config import MoEConfig, RunConfig, TaskConfig, TrainConfig
from .data import TaskData, make_task
from .lm import LMConfig, LMTrainer, build_lm, trace_lm
from .models import MLPMoE, ModelOutput, build_model
from .multiseed import MultiSeedTrainer, SeedResult, train_seeds
from .nn import DenseFFN, MoELayer, make_layer
from .trace import RoutingTrace, trace_layer
from .train import History, NonFiniteLossError, Trainer, resolve_device, trace_model, train
from .wikitext import load_wikitext

__version__ = "0.1.0"

__all__ = ["MoEConfig", "RunConfig", "TaskConfig", "TrainConfig", "TaskData", "make_task", "MLPMoE", "ModelOutput",
           "build_model", "DenseFFN", "MoELayer", "make_layer", "RoutingTrace", "trace_layer", "History",
           "NonFiniteLossError", "Trainer", "resolve_device", "trace_model", "train", "LMConfig", "LMTrainer", "build_lm",
           "trace_lm", "load_wikitext", "MultiSeedTrainer", "SeedResult", "train_seeds", "__version__"]
