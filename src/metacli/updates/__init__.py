"""Inner-loop update rules (``algo.update``): one module per rule, registered by its name."""
