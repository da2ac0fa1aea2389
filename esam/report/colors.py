"""One colour per method, the same in every panel, every report and the bench's figures.

Colours follow the method registry by registered name (``optimizer.name``), never the order in
which a plot meets its methods: SGD, SAM and ESAM keep fixed colours far apart (grey, blue, red);
the other registered methods take the palette in alphabetical order. A name the registry does not
know (a run from another version) gets a spare colour chosen by its name.
"""
from __future__ import annotations

import zlib

PAPER = {"sgd": "#7f7f7f", "sam": "#1f63b5", "esam": "#d62728"}
PALETTE = ("#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#00796b", "#000000",
           "#f0c808", "#6a3d9a", "#b15928")
SPARE = ("#a6cee3", "#fb9a99", "#b2df8a", "#cab2d6", "#fdbf6f", "#ffff99")


def method_colors() -> dict[str, str]:
    """{registered method name: colour} for every method in esam.optim.METHODS."""
    from esam.optim import METHODS

    others = sorted(m for m in METHODS if m not in PAPER)
    colors = {m: c for m, c in PAPER.items() if m in METHODS}
    colors.update({m: PALETTE[i] if i < len(PALETTE) else SPARE[i % len(SPARE)] for i, m in enumerate(others)})
    return colors


def method_color(method: str) -> str:
    """The colour of one method (registry name); unknown names: a spare colour by name."""
    return method_colors().get(str(method)) or SPARE[zlib.crc32(str(method).encode()) % len(SPARE)]
