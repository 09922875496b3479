"""Everything the CLI does, as importable functions: a face over the rooms that hold them (``tasks/`` for
training, evaluation, export, pictures, the zoo table and the demo; ``pix2seq/task.py``; ``heads/task.py``; ``viz/roadmap.py``;
``data/scenes.py``). Import from here or from the room itself: both stay valid."""
from __future__ import annotations

from .data.scenes import make_scenes
from .heads.task import (run_detect_eval, run_detect_predict, run_detect_train, run_segment_eval, run_segment_predict,
                         run_segment_train)
from .models import create_model, list_models
from .models.measure import count_macs, measure_throughput
from .pix2seq.task import run_pix2seq_eval, run_pix2seq_predict, run_pix2seq_train
from .rebuild import model_kwargs, probe_head
from .tasks.classify import (EvalSource, evaluate_classifier, evaluate_classifiers, load_eval_source, run_eval,
                             run_finetune, run_linprobe)
from .tasks.demo import DEMO_DATA, run_demo, run_pretrain_demo
from .tasks.export import run_export
from .tasks.pretrain import run_pretrain
from .tasks.visualize import (load_backbone, run_visualize_collapse, run_visualize_curves, run_visualize_erf,
                              run_visualize_recon, sample_images)
from .tasks.zoo import ModelRow, format_table, machine_description, model_table
from .viz.roadmap import write_roadmap

__all__ = ["DEMO_DATA", "EvalSource", "ModelRow", "count_macs", "create_model", "evaluate_classifier", "evaluate_classifiers",
           "format_table", "list_models", "load_backbone", "load_eval_source", "machine_description", "make_scenes",
           "measure_throughput", "model_kwargs", "model_table", "probe_head", "run_demo", "run_detect_eval",
           "run_detect_predict", "run_detect_train", "run_eval", "run_export", "run_finetune", "run_linprobe",
           "run_pix2seq_eval", "run_pix2seq_predict", "run_pix2seq_train", "run_pretrain", "run_pretrain_demo",
           "run_segment_eval", "run_segment_predict", "run_segment_train", "run_visualize_collapse", "run_visualize_curves",
           "run_visualize_erf", "run_visualize_recon", "sample_images", "write_roadmap"]
