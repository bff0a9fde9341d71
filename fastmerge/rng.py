"""Counter-based random numbers for the DARE mask, identical on every path.

The mask must not depend on how the work is launched (block size, grid, chunking, threads), so
every uniform is a pure function of (seed, tensor name, model group, element index): Philox4x32-10
as in ``triton.language.randint4x`` and ``uint_to_uniform_float``. This module is the torch
implementation used by the reference and the tests; uint32 arithmetic is emulated in int64. The
key derivation and chunking (all the fused CPU path needs) do not import torch.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
UNIFORM_SCALE = 4.6566127342e-10
CHUNK_ELEMENTS = 2**31
MODELS_PER_CALL = 4


#: the largest DARE seed a recipe's ``random_seed`` or ``--seed`` may give (seeds are 0..SEED_MAX)
SEED_MAX = 2**64 - 1


def group_seed(seed: int, tensor_name: str, group: int) -> int:
    """The 63-bit Philox key of one tensor (or chunk) and one group of four models."""
    digest = hashlib.blake2b(f"{seed}:{tensor_name}:{group}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def chunks(numel: int) -> list[tuple[int, int]]:
    """[start, end) of each 2**31-element chunk of a tensor (one chunk, possibly empty, when small).

    Reads CHUNK_ELEMENTS at call time, so tests can shrink it to exercise chunking."""
    return [(s, min(numel, s + CHUNK_ELEMENTS)) for s in range(0, max(numel, 1), CHUNK_ELEMENTS)]


def chunk_name(tensor_name: str, chunk: int, numel: int) -> str:
    """Tensors of 2**31+ elements draw per 2**31-element chunk, named ``name#c``."""
    return tensor_name if numel < CHUNK_ELEMENTS else f"{tensor_name}#{chunk}"


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a*b for a constant a and uint32 values b held in int64."""
    b_hi = b >> 16
    b_lo = b & 0xFFFF
    p1 = b_hi * a  # < 2**48
    p0 = b_lo * a  # < 2**48
    hi = (p1 + (p0 >> 16)) >> 16
    lo = (((p1 & 0xFFFF) << 16) + p0) & MASK32
    return hi, lo


def philox4x32(
    counter: torch.Tensor, key: int, rounds: int = PHILOX_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with counter (j, 0, 0, 0); returns four uint32 lanes as int64 tensors."""
    import torch

    c0 = counter.to(torch.int64) & MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = key & MASK32
    k1 = (key >> 32) & MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for 32-bit lanes: [0, 1) in fp32."""
    import torch

    x = torch.where(x >= 2**31, x - 2**32, x)  # reinterpret as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def uniforms(seed: int, tensor_name: str, k: int, index: torch.Tensor) -> torch.Tensor:
    """U_k(j) of section 3 for element indices ``index`` (int64, < 2**31) of one chunk."""
    lanes = philox4x32(index, group_seed(seed, tensor_name, k // MODELS_PER_CALL))
    return uint_to_uniform(lanes[k % MODELS_PER_CALL])
