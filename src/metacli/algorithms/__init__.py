"""Meta-learning algorithms (``algo=``): one module per option, registered by its name."""
