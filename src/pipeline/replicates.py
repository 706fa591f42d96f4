"""Replicates: every model trained, distilled and sampled once per seed, so a table can show a spread.

A comparison between a teacher and its student is evidence only beyond the spread that training
noise, initialisation and sampling noise alone produce. With `replicates: R` in the config, each
teacher and student `<name>` is run R times: replicate 0 is `<name>` itself with its configured seeds
(so raising R reuses every finished run), replicate r >= 1 is `<name>.r<r>`, whose training seed and
sampling seed are derived from the configured ones and r. A student's replicate r distils its
teacher's replicate r. Training subsets are shared: replicates measure what the randomness of one
study costs, on the same data, as the study's single runs would be repeated.

The training-replay yardstick has replicates too (`replay~digits-48.r1`, a fresh draw from the
training set), and so do the real and blurred held-out yardsticks where `yardsticks.reserve` is larger than
their sample count (a draw without replacement from the reserve); see yardsticks.REPLICATED.

This module only names replicates and derives their seeds; config.expand_replicates applies them.
"""
from __future__ import annotations

import re

import numpy as np

SEP = ".r"  # configured names may not end in `.r<digits>` (the schema's name pattern)
_SUFFIX = re.compile(r"^(?P<base>.+)\.r(?P<r>[1-9][0-9]*)$")
REPLICATE_STREAM = 0x5EED  # third entropy word: replicate seeds apart from every other use of (seed, r)


def replicate_id(name: str, r: int) -> str:
    """The name of replicate `r` of a model or yardstick (replicate 0 keeps the name)."""
    if r < 0:
        raise ValueError(f"replicate index must be >= 0, got {r}")
    return name if r == 0 else f"{name}{SEP}{int(r)}"


def split(name: str) -> tuple[str, int]:
    """(configured name, replicate index) of a model or yardstick id; a snapshot id `<run>@<step>` keeps
    its step on the configured name: `cd-48.r1@200` -> (`cd-48@200`, 1)."""
    run, at, step = name.partition("@")
    m = _SUFFIX.match(run)
    if m is None:
        return name, 0
    return m.group("base") + at + step, int(m.group("r"))


def of(name: str, count: int) -> list[str]:
    """The ids of all `count` replicates of a configured model, snapshot or yardstick."""
    run, at, step = name.partition("@")
    return [replicate_id(run, r) + at + step for r in range(count)]


def seed(base: int, r: int) -> int:
    """The seed of replicate `r` given the configured seed: itself for r = 0, else a 31-bit seed
    drawn from (seed, r), so replicates share no stream with each other or with the configured seed's
    uses (torch.manual_seed, numpy generators, SeedSequence words)."""
    if r == 0:
        return int(base)
    return int(np.random.SeedSequence([int(base), int(r), REPLICATE_STREAM]).generate_state(1, np.uint32)[0] >> 1)
