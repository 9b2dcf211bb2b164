"""Scores: the confusion matrix and IoU (the standard mIoU), video consistency, scoring predictions."""
