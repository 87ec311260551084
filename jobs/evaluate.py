"""Scoring label maps against a corpus's ground truth, as the demo and the query tests use it: the class map of a
labelled sample and dataset mIoU, both from `refbank eval`'s own code (jobs.eval), so every figure is one scorer's."""

from jobs.eval.metrics import mean_iou
from jobs.eval.truth import class_map

__all__ = ["class_map", "mean_iou"]
