"""Everything in params.yaml checked at once (`metaflowlib check`): every section and every method block."""

from __future__ import annotations

from typing import Any

from metaflowlib.config import Params, parse_params
from metaflowlib.config.learned_optimizer import LearnedOptimizerParams
from metaflowlib.config.methods import MethodSpec, method_spec
from metaflowlib.config.shift import ShiftParams
from metaflowlib.config.tta import TTAParams
from metaflowlib.errors import ConfigError

EXPERIMENTS = {"tta": TTAParams, "shift": ShiftParams, "optimizer": LearnedOptimizerParams}


def check_params(data: Any, origin: str = "params") -> tuple[Params, dict[str, MethodSpec]]:
    """Params with every section loaded and each method's resolved block; all problems in one ConfigError."""
    params = parse_params(data, origin, **EXPERIMENTS)
    specs, problems = {}, []
    for key in params.methods:
        try:
            specs[key] = method_spec(params, key)
        except ConfigError as error:
            problems.append(str(error).split("\n", 1)[-1] if "\n" in str(error) else f"  {error}")
    if problems:
        raise ConfigError(f"{origin}: method blocks\n" + "\n".join(problems))
    return params, specs
