"""One self-contained file per model family."""
