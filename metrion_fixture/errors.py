class MetrionCacheError(ValueError):
    """A configuration error: raised at once, with what to change."""
