"""Competition pipeline for semantic segmentation (VSPW, Cityscapes, CamVid, folder datasets).

Stage scripts (``python pipeline/<stage>.py``) are thin wrappers over the library
in its subpackages (core, data, models, training, inference, ensembling, evaluation,
submission, reporting, launch); see the README for the chain that ``dvc repro`` runs.
"""

__version__ = "0.1.0"
