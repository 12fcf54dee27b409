"""One seeding scheme for every random draw sdloop makes.

A draw is named by its parts (a seed, then any mix of strings and integers: a step, an item's hash, a variant, a
purpose), and the parts are hashed into a 63-bit seed. Named draws do not depend on the order in which other draws
happen, so a resumed run, another process of a data-parallel run, or a cache built later all see the same numbers as
an uninterrupted run, with no random state to save.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Union

Part = Union[int, str]
MAX_SEED = 2**63 - 1


def derive_seed(*parts: Part) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (stable across processes and Python versions)."""
    text = "\x1f".join(f"{type(p).__name__}:{p}" for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & MAX_SEED


def py_rng(*parts: Part) -> random.Random:
    """A ``random.Random`` seeded by ``derive_seed(*parts)``."""
    return random.Random(derive_seed(*parts))


def torch_generator(*parts: Part, device: str = "cpu") -> Any:
    """A ``torch.Generator`` seeded by ``derive_seed(*parts)``."""
    import torch

    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def seed_torch(*parts: Part) -> int:
    """Seed torch's global generator (draws made inside libraries, e.g. dropout) by the parts; return the seed."""
    import torch

    seed = derive_seed(*parts)
    torch.manual_seed(seed)
    return seed
