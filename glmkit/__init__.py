"""glmkit: GLM-4, XGLM and Persimmon in plain PyTorch."""

__version__ = "0.1.0"
