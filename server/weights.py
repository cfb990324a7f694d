"""Model weights on the wire: Flower's ArrayRecord to and from the name -> numpy array dicts the server computes with.

Its own module because both the round logic (server.strategy) and reply admission (server.admission) read
replies' weights, and the job (server.app) sends them.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord


def state_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.to_torch_state_dict().items()}


def numpy_to_arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
