"""glora: federated LoRA fine-tuning with gauge-aware aggregation.

The math core (this package's ``types``, ``validation``, ``linalg`` and ``aggregators``) imports
no engine; the simulator, the Flower app and the CLI are thin adapters over it.
"""

from glora import aggregators
from glora.types import (
    ClientPlan,
    ClientUpdate,
    InvalidUpdate,
    LoRAFactors,
    ServerState,
    UnsupportedRanks,
    fold,
    lora_scale,
    unfold,
)

__all__ = [
    "ClientPlan",
    "ClientUpdate",
    "InvalidUpdate",
    "LoRAFactors",
    "ServerState",
    "UnsupportedRanks",
    "aggregators",
    "fold",
    "lora_scale",
    "unfold",
]
__version__ = "0.1.0"
