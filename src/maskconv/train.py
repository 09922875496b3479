"""The training tasks' functions, under their former home (kept importable): they live in
``tasks/pretrain.py`` (``run_pretrain``) and ``tasks/classify.py`` (fine-tuning, linear probing, evaluation);
``model_kwargs`` and ``probe_head`` in ``rebuild.py``."""
from __future__ import annotations

from .engine.loop import FitResult, fit
from .rebuild import model_kwargs, probe_head
from .tasks.classify import (WEIGHTS, EvalSource, evaluate_classifier, evaluate_classifiers, load_eval_source,
                             run_eval, run_finetune, run_linprobe)
from .tasks.pretrain import run_pretrain

__all__ = ["WEIGHTS", "EvalSource", "FitResult", "evaluate_classifier", "evaluate_classifiers", "fit",
           "load_eval_source", "model_kwargs", "probe_head", "run_eval", "run_finetune", "run_linprobe",
           "run_pretrain"]
