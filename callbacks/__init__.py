"""Lightning callbacks that evaluate robustness: accuracy under attack and certification."""

from callbacks.certification import Certification
from callbacks.evaluation import EvaluationCallback
from callbacks.perturbed_accuracy import PerturbedAccuracy
from callbacks.smoothed_attack import SmoothedAttack

__all__ = ["Certification", "EvaluationCallback", "PerturbedAccuracy", "SmoothedAttack"]
