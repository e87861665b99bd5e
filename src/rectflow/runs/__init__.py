"""Run jobs: configs, run directories, training/reflow/distillation/PeRFlow/diagnose jobs,
evaluation, plots, the HTML report and the demo.  The CLI is a thin layer over this package."""

from rectflow.runs.config import ModelConfig, CouplingConfig, TimeConfig, EvalConfig, ReflowConfig, GuidanceConfig, ExperimentConfig, load_config, config_from_dict, apply_overrides, config_to_dict
from rectflow.runs.rundir import RESUMABLE_TRAIN_KEYS, semantic_config, diff_keys, guard_run_dir
from rectflow.runs.experiment import Run, build_distributions, build_model, build_objective, model_config, train_run, load_run, sample_shape
from rectflow.runs.evaluation import evaluate_solvers, format_table, heldout_samples, evaluate_run
from rectflow.runs.lineage import PairOptions, pairs_dir, as_run, run_checksum, stage_label, default_pairs_dir, generate_run_pairs, init_checkpoint, child_config, train_child, progress_overrides
from rectflow.runs.reflow import default_reflow_dir, train_reflow, reflow_chain
from rectflow.runs.distill import train_distill
from rectflow.runs.diagnose import STAGE_SOLVERS, diagnose_runs, format_stage_table
from rectflow.runs.perflow import PeRFlowSettings, PeRFlowJob, load_perflow_teacher, train_perflow, load_perflow

__all__ = [
    "ModelConfig",
    "CouplingConfig",
    "TimeConfig",
    "EvalConfig",
    "ReflowConfig",
    "GuidanceConfig",
    "ExperimentConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "config_to_dict",
    "RESUMABLE_TRAIN_KEYS",
    "semantic_config",
    "diff_keys",
    "guard_run_dir",
    "Run",
    "build_distributions",
    "build_model",
    "build_objective",
    "model_config",
    "train_run",
    "load_run",
    "sample_shape",
    "evaluate_solvers",
    "format_table",
    "heldout_samples",
    "evaluate_run",
    "PairOptions",
    "pairs_dir",
    "as_run",
    "run_checksum",
    "stage_label",
    "default_pairs_dir",
    "generate_run_pairs",
    "init_checkpoint",
    "child_config",
    "train_child",
    "progress_overrides",
    "default_reflow_dir",
    "train_reflow",
    "reflow_chain",
    "train_distill",
    "STAGE_SOLVERS",
    "diagnose_runs",
    "format_stage_table",
    "PeRFlowSettings",
    "PeRFlowJob",
    "load_perflow_teacher",
    "train_perflow",
    "load_perflow",
]
