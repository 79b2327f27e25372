"""An example project on metacli: an algorithm, a model and an update rule of its own.

- ``algorithms.SmoothedMAML``: MAML with label smoothing on the query loss;
- ``models.ResidualMLP``: the MLP with skip connections between equal-width layers;
- ``updates.RMSPropRule``: RMSProp in the inner loop, its running average per task.
"""
