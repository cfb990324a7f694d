"""CancerMoE: the science of CancerMoE-FL (banks, model, survival), free of Flower and MLflow."""

__version__ = "0.1.0"
