"""Pictures. matplotlib is imported lazily inside each function (the `viz` extra)."""
