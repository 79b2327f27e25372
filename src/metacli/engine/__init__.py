"""The adaptation engine: how each task of a meta-batch is computed.

- ``random``: each task's own random stream, a pure function of the task's key, so draws
  are identical under vmap, loop and threads and after a resume.
- ``executor``: runs a per-task function over a meta-batch (vmap, loop or threads).
- ``inner``: the one inner-loop driver, which adapts a task's parameters step by step
  with an update rule (``metacli.updates``).
"""
