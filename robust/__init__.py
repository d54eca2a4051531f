"""Framework-free robustness algorithms: adversarial attacks and randomized-smoothing statistics."""
