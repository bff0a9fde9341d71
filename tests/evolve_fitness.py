"""A synthetic evolve fitness with a known optimum, importable by spawned workers and by the
``fastmerge evolve`` subprocess of the resume test (so it lives in a module, not in a test)."""

from __future__ import annotations

import math
import os
import time


def distance_to(target: str, sleep: float = 0.0, crash_once: str | None = None, crash_on_call: int = 1):
    """Evaluator factory: ``neg_distance`` = -||merged - target||_2 over the target's tensors.

    Its maximum (0) is at the genome that produced ``target`` (a safetensors file of a merge), so
    a search that works must converge there. ``sleep`` slows each trial (to kill a run mid-generation).
    ``crash_once``: a marker file; the process that first reaches its ``crash_on_call``-th trial
    while the file does not exist creates it and dies (``os._exit``): one worker crash per run.
    """
    from safetensors.torch import load_file

    want = {k: v.double() for k, v in load_file(target).items()}
    calls = 0

    def fitness(model, tokenizer) -> dict:
        nonlocal calls
        calls += 1
        if crash_once and calls == crash_on_call:
            try:
                os.close(os.open(crash_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        if sleep:
            time.sleep(sleep)
        state = model.state_dict()
        d2 = sum(float(((state[k].double() - t) ** 2).sum()) for k, t in want.items())
        return {"neg_distance": -math.sqrt(d2), "distance": math.sqrt(d2)}

    return fitness
