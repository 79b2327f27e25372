"""CAVIA (Zintgraf et al. 2019): fast context adaptation.

The inner loop adapts only a small vector of context parameters, reset to zero for every
task; the network (and the layers that read the context) is shared across tasks and
meta-learned by the outer loop through the adapted context (second order unless
``first_order``). As the authors' code (lmzintgraf/cavia): the context is concatenated
to the input of an MLP (``regression/cavia_model.py``), and conditions a Conv-4's
feature maps by FiLM (``classification/models.py``: a linear map from the context to a
scale and shift per channel, after batch norm and max-pooling, before the ReLU).

The context lives in the model (``model.context``, ``model.film``: zeros that the outer
optimizer never moves, so each task starts from zero); this algorithm sets them from
its settings and adapts them alone (``algo.adapt=[context]``). ``algo=maml
algo.adapt=[context] model.context=5`` is the same algorithm. Deviations: docs/cavia.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from metacli.algorithms.base import AlgoConfig
from metacli.algorithms.maml import MAML, MAMLConfig
from metacli.config import require, require_at_least
from metacli.errors import ConfigError


@dataclass
class CAVIAConfig(MAMLConfig):
    name: str = "cavia"
    adapt: Any = field(default_factory=lambda: ["context"])
    inner_lr: float = 1.0  # the code's --lr_inner
    inner_steps: int = 1  # regression's --num_inner_updates (classification: 2)
    test_inner_steps: int | None = None  # the training steps, as the code evaluates
    context_params: int = 5  # regression's --num_context_params (classification: 100)
    context_in: list[int] = field(default_factory=lambda: [3])  # Conv-4 blocks FiLM'd
    film_hidden: int = 0  # --num_film_hidden_layers

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least("algo.context_params", self.context_params, 1)
        require(
            bool(self.context_in) and all(b in (1, 2, 3, 4) for b in self.context_in),
            "algo.context_in",
            self.context_in,
            "list the Conv-4 blocks the context conditions, among 1, 2, 3, 4 (e.g. [3])",
        )
        require(self.film_hidden in (0, 1), "algo.film_hidden", self.film_hidden, "0 or 1")


class CAVIA(MAML, key="cavia"):
    Config: ClassVar[type[AlgoConfig]] = CAVIAConfig

    @classmethod
    def configure(cls, cfg: AlgoConfig, model_cfg: Any, run_cfg: Any) -> list[str]:
        assert isinstance(cfg, CAVIAConfig)
        if not hasattr(model_cfg, "context"):
            raise ConfigError(
                f"algo=cavia adapts context parameters that model={model_cfg.name} does "
                f"not take. Use model=mlp (the context joins the input) or model=conv4 "
                f"(FiLM of the blocks in algo.context_in)."
            )
        given: dict[str, tuple[Any, Any, Any, str]] = {
            "context": (model_cfg.context, 0, cfg.context_params, "context_params")
        }
        if hasattr(model_cfg, "film"):
            given["film"] = (list(model_cfg.film), [], list(cfg.context_in), "context_in")
        for key, (value, default, wanted, setting) in given.items():
            if value not in (default, wanted):  # set on the model by hand: say where it goes
                raise ConfigError(
                    f"algo=cavia sets model.{key} from algo.{setting} ({wanted}), but "
                    f"model.{key}={value} was given. Set algo.{setting}={value} instead, "
                    f"and leave model.{key} out."
                )
        model_cfg.context = cfg.context_params
        notes = [f"cavia: {cfg.context_params} context parameters (model.context)"]
        if hasattr(model_cfg, "film"):
            model_cfg.film, model_cfg.film_hidden = list(cfg.context_in), cfg.film_hidden
            notes.append(f"cavia: FiLM of Conv-4 blocks {list(cfg.context_in)} (model.film)")
        return notes
