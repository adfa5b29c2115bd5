"""Adaptation of a trained linear hardware model onto the nonlinear gain-cell model (eq. 9).

The linear intermediate model is trained with the linear cell; the real cell is nonlinear. Rather than
retrain, the per-head scalers around every attention (``q~ = a q + b`` ... ``out = a y + b``) are re-set
so that each scaling stage's output has the same mean and standard deviation in the nonlinear model as
in the linear one.

Modules, lowest first:

* :mod:`~gaincell.adapt.algorithm`: eq. 9 itself (statistics, damped update, convergence), no I/O;
* :mod:`~gaincell.adapt.losses`, :mod:`~gaincell.adapt.histograms`: validation losses on fixed batches,
  value histograms for the figure;
* :mod:`~gaincell.adapt.inputs`: the checkpoint a stage starts from, the study's fixed batches;
* stages (``python -m gaincell <stage>``): ``adapt`` (:mod:`~gaincell.adapt.stage`), ``study_eval``
  (:mod:`~gaincell.adapt.study_eval`, the validation loss of every study variant on the same batches),
  ``leakage_eval`` (:mod:`~gaincell.adapt.leakage`, the leakage sweep).

Under ``torchrun`` the calibration batches are split across ranks and the statistics (and losses)
are all-reduced, so every rank computes the same update and ends with identical scalers.
"""
from gaincell.adapt.algorithm import (
                                      AdaptResult,
                                      AdaptSettings,
                                      Statistics,
                                      adapt_scalers,
                                      attention_cores,
                                      equation_9,
                                      get_scalers,
                                      measure_statistics,
                                      set_scalers,
)
from gaincell.adapt.histograms import capture_values, histogram_rows
from gaincell.adapt.leakage import leakage_eval, leakage_tag
from gaincell.adapt.losses import batch_losses, mean_loss, paired_difference
from gaincell.adapt.stage import run

__all__ = ["AdaptResult", "AdaptSettings", "Statistics", "adapt_scalers", "attention_cores", "equation_9",
           "get_scalers", "measure_statistics", "set_scalers", "capture_values", "histogram_rows",
           "leakage_eval", "leakage_tag", "batch_losses", "mean_loss", "paired_difference", "run"]
