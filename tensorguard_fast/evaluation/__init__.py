"""Evaluation fixtures (attacks, model zoo, TensorGuard's own way, the demo). The library never imports this."""
