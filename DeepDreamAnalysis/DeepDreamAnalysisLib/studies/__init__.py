"""Studies: many runs compared and pooled (compare, sensitivity, the study engine).

Imports point down: ``studies`` uses the engine (analysis, dream, features, report); nothing here
imports the command line. ``DeepDreamAnalysisLib.compare`` and ``DeepDreamAnalysisLib.sensitivity``
remain as aliases of :mod:`.studies.compare` and :mod:`.studies.sensitivity`.
"""

from .compare import (
    BASE_CURVES,
    DEFAULT_RESTART_NOISE_STD,
    Comparison,
    CompareProgress,
    compare_models,
    compare_on_study,
    plot_comparison,
    restart_seeds,
    write_comparison,
)
from .engine import (
    StudyEngineError,
    StudyOutcome,
    StudyProgress,
    print_progress,
    run_study,
    run_study_outcome,
)
from .sensitivity import feature_sensitivity, rank_features, result_sensitivity
from .spec import RunSpec, StudySpec, StudySpecError, expand_runs, load_study

__all__ = ["BASE_CURVES", "DEFAULT_RESTART_NOISE_STD", "Comparison", "CompareProgress", "compare_models",
           "compare_on_study",
           "plot_comparison", "restart_seeds", "write_comparison", "feature_sensitivity", "rank_features",
           "result_sensitivity", "run_study", "run_study_outcome", "StudyEngineError", "StudyOutcome", "StudyProgress",
           "print_progress", "RunSpec", "StudySpec", "StudySpecError", "expand_runs", "load_study"]
