"""Task distributions (``task=``): one module per option, registered by its name."""
