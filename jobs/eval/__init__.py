"""`refbank eval`: retrieval segmentation scored on a labelled held-out corpus (mIoU, per-class IoU, pixel accuracy
and confusion per mode; foreground IoU / F-measure / MAE; reference-mode "no target" precision), with an oracle
row and ablations in one run (docs/QUALITY.md, "Evaluation")."""

from jobs.eval.config import MODES, EvalConfig, Protocol, ReferenceTrials, Variant, parse_ablations
from jobs.eval.metrics import BinaryScores, Confusion, ReferenceScores, mean_iou
from jobs.eval.run import EvalReport, evaluate
from jobs.eval.truth import IGNORED, class_map

__all__ = [
    "IGNORED", "MODES", "BinaryScores", "Confusion", "EvalConfig", "EvalReport", "Protocol", "ReferenceScores",
    "ReferenceTrials", "Variant", "class_map", "evaluate", "mean_iou", "parse_ablations",
]
