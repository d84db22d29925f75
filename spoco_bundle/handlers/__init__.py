"""Ignite handlers of the SPOCO training workflow (``configs/train.json``), one module per concern:

- :mod:`.teacher`: the momentum teacher's update;
- :mod:`.foreground`: the foreground head's regime, weight warm-up and threshold calibration;
- :mod:`.model_card`: what the model records about its training, and its card;
- :mod:`.checkpoints`: the resume checkpoint and the best-model saver's memory;
- :mod:`.schedule`: the time budget and the last validation;
- :mod:`.logs`: the run's length, progress, loss terms, TensorBoard preview and log file;
- :mod:`.suggestions`: inference's per-object scores written as what to outline next (``spoco suggest``).
"""

from spoco_bundle.handlers.checkpoints import (
    BestCheckpointState,
    ResumeCheckpointLoader,
    ResumeCheckpointSaver,
    resume_state,
)
from spoco_bundle.handlers.foreground import (
    ForegroundCalibration,
    ForegroundRegimeHandler,
    LossWeightWarmup,
    calibration_method,
    deterministic_part,
    lee_liu_threshold,
)
from spoco_bundle.handlers.logs import (
    LossTermsLogger,
    TensorBoardInstancePreview,
    TrainingLengthLogger,
    TrainingProgressBar,
    add_log_file,
    instance_preview,
    remove_log_file,
)
from spoco_bundle.handlers.model_card import ModelCardWriter, TrainingSetRecorder
from spoco_bundle.handlers.schedule import UNLIMITED_EPOCHS, TrainingTimeLimit, ValidateOnTerminate
from spoco_bundle.handlers.suggestions import SuggestionWriter
from spoco_bundle.handlers.teacher import MomentumTeacherHandler

__all__ = [
    "MomentumTeacherHandler",
    "SuggestionWriter",
    "ForegroundRegimeHandler",
    "LossWeightWarmup",
    "ForegroundCalibration",
    "lee_liu_threshold",
    "deterministic_part",
    "calibration_method",
    "TrainingSetRecorder",
    "ModelCardWriter",
    "ResumeCheckpointSaver",
    "ResumeCheckpointLoader",
    "BestCheckpointState",
    "resume_state",
    "UNLIMITED_EPOCHS",
    "TrainingTimeLimit",
    "ValidateOnTerminate",
    "TrainingLengthLogger",
    "TrainingProgressBar",
    "LossTermsLogger",
    "TensorBoardInstancePreview",
    "instance_preview",
    "add_log_file",
    "remove_log_file",
]
