"""glmkit tokenizers and chat templates against the reference (transformers 4.56.2)."""
