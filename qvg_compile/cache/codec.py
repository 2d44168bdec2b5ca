"""The flat argument format of the ``qvg::cache_*`` ops, both ways.

A custom op takes tensors, ints, int lists and strings, so a `View` crosses the op boundary as
int lists that may hold SymInts while a graph is traced:

* *pieces*: ``[kind, a, n] * pieces`` in view order; kind `RUN_PIECE` is the store positions
  ``[a, a + n)``, kind `DENSE_PIECE` is ``n`` tokens of dense piece ``a`` (tokens appended by
  ``cat``).
* *lead*: ``[offset, length, interleave, tile]`` per leading dim (a `Lead`).
* *sel*: ``[offset, length] * dims``, the store slice along each leading dim; empty when the view
  covers the whole lead.

The ``flat_*`` functions encode (the dispatch rules, at trace time), the others decode (the op
bodies, at run time, with real ints).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .view import RUN, Lead, View

RUN_PIECE, DENSE_PIECE = 0, 1
PIECE_INTS, LEAD_INTS = 3, 4


def flat_pieces(view: View, runs_only: bool = False) -> list[Any]:
    """The view's pieces (only its store runs with ``runs_only``)."""
    out: list[Any] = []
    for kind, a, n in view.pieces:
        if kind == RUN:
            out += [RUN_PIECE, a, n]
        elif not runs_only:
            out += [DENSE_PIECE, a, n]
    return out


def flat_lead(view: View) -> list[Any]:
    """The view's leading dims."""
    return [x for ax in view.lead for x in (ax.offset, ax.length, ax.interleave, ax.tile)]


def flat_sel(view: View, lead: Sequence[Any]) -> list[Any]:
    """The view's store slice for a store whose leading sizes are ``lead``."""
    sel = view.lead_sel(lead)
    return [] if sel is None else [x for pair in sel for x in pair]


def piece_tokens(pieces: Sequence[Any]) -> Any:
    """Tokens of the flat pieces."""
    return sum(pieces[2::PIECE_INTS])


def run_pieces_only(pieces: Sequence[Any]) -> bool:
    """Whether every flat piece is a store run."""
    return all(int(kind) == RUN_PIECE for kind in pieces[0::PIECE_INTS])


def positions(pieces: Sequence[int]) -> torch.Tensor:
    """Host int64 store positions of the flat pieces in order (-1 for each dense token)."""
    out = [torch.arange(int(a), int(a) + int(n)) if int(kind) == RUN_PIECE else torch.full((int(n),), -1)
           for kind, a, n in zip(pieces[0::PIECE_INTS], pieces[1::PIECE_INTS], pieces[2::PIECE_INTS])]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def leads(flat: Sequence[int]) -> tuple[Lead, ...]:
    """The `Lead` s of a flat lead."""
    return tuple(Lead(*(int(x) for x in flat[i:i + LEAD_INTS])) for i in range(0, len(flat), LEAD_INTS))


def lead_sel(flat: Sequence[int]) -> Optional[tuple[tuple[int, int], ...]]:
    """``((offset, length), ...)`` of a flat sel; None (the whole lead) when it is empty."""
    return tuple((int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)) if flat else None
