"""Lightning callbacks: evaluation under attack (and certification) on the test/validation set."""

from callbacks.certification import Certification as Certification
from callbacks.perturbed_accuracy import PerturbedAccuracy

__all__ = ["PerturbedAccuracy"]
