"""A synthetic evolve fitness with a known optimum, importable by spawned workers and by the
``fastmerge evolve`` subprocess of the resume test (so it lives in a module, not in a test)."""

from __future__ import annotations

import math
import time


def distance_to(target: str, sleep: float = 0.0):
    """Evaluator factory: ``neg_distance`` = -||merged - target||_2 over the target's tensors.

    Its maximum (0) is at the genome that produced ``target`` (a safetensors file of a merge), so
    a search that works must converge there. ``sleep`` slows each trial (to kill a run mid-generation).
    """
    from safetensors.torch import load_file

    want = {k: v.double() for k, v in load_file(target).items()}

    def fitness(model, tokenizer) -> dict:
        if sleep:
            time.sleep(sleep)
        state = model.state_dict()
        d2 = sum(float(((state[k].double() - t) ** 2).sum()) for k, t in want.items())
        return {"neg_distance": -math.sqrt(d2), "distance": math.sqrt(d2)}

    return fitness
