"""`StoreSpec`: the static description of one compressed store, and its arrays.

A store holds the tokens ``[0, capacity)`` of one cache tensor in the normalised layout
``[*lead, N, D]`` (the sequence dim moved next to last, every other dim but the channels a
leading dim). Its last dim may be split into *parts* (K and V packed along the channels, as
MAGI-1 does), each quantized on its own with its role's bit width. All parts share one token
state, so a token is sealed, dense or empty in every part at once.

Arrays, in the order the ``qvg::cache_*`` ops take them (``P`` parts; ``T = slots * L + sinks``
dense rows; ``K`` codebook slots; ``C`` centroids per codebook; ``Dp = D * bits / 8``):

=============  ===========  ==========================  =========================================
name           device       dtype / shape               holds
=============  ===========  ==========================  =========================================
``codes{p}``   cache's      uint8 ``[*lead, cap, Dp]``   packed residual codes (`PackedStore`)
``scales{p}``  cache's      fp8/fp16 ``[*lead, cap, D/G]``
``zeros{p}``   cache's      like scales (asymmetric codes only)
``assign{p}``  cache's      uint8 ``[S, *lead, cap]``
``cents{p}``   cache's      ``[K, S, *lead, C, D]``     one codebook per slot
``tail{p}``    cache's      cache dtype ``[*lead, T, D]`` dense rows: slots of L tokens, then sinks
``seg_ids``    cache's      index ``[cap]``             codebook slot of every sealed token
``pos_map``    host (CPU)   index ``[cap]``             per token: `HOLE`, a dense row ``r >= 0``,
                                                        or sealed in slot ``k`` as ``-(k + 2)``
``slots``      host         int64 ``[slots, 2]``        per dense slot: first position (-1 free), age
``segs``       host         int64 ``[K, 4]``            per codebook: live tokens, C, uid, uses
``counters``   host         int64 ``[3]``               next age, latest codebook slot (-1 none),
                                                        state stamp (`next_stamp`)
=============  ===========  ==========================  =========================================

The two per-token arrays use the *index* dtype, int16 whenever every dense row and codebook slot
fits (it does for any realistic slot length and history), else int32: at 12 heads x 128 channels
each int32 array costs 0.02 bits per cached element, and 0.13 at 2 KV heads.

The token state lives on the host so that deciding where a write goes never waits for the GPU;
``seg_ids`` mirrors it on the device for the attention kernel. The spec is a frozen dataclass of
plain values: it hashes, pickles and round-trips through JSON (`to_json` / `from_json`). The
leading sizes and the capacity are not part of it: they are the arrays' shapes, which may be
symbolic while a graph is traced.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, Optional, Sequence

import torch

from ..quant.config import QVGConfig
from ..quant.packing import packed_size
from .policy import CachePolicy

HOLE = -1
ROLES = ("key", "value")
HOST = torch.device("cpu")
PART_ARRAYS = ("codes", "scales", "zeros", "assign", "cents", "tail")
SHARED_ARRAYS = ("seg_ids", "pos_map", "slots", "segs", "counters")
# Where the token map and the counters sit in a store's array list (the shared arrays come last),
# for the ops' replays, which read them without building a `Store`.
POS_MAP_AT = SHARED_ARRAYS.index("pos_map") - len(SHARED_ARRAYS)
COUNTERS_AT = SHARED_ARRAYS.index("counters") - len(SHARED_ARRAYS)
# segs columns
LIVE, CSIZE, UID, USES = 0, 1, 2, 3
# counters entries
NEXT_AGE, LATEST, STAMP = 0, 1, 2
_stamps = itertools.count(1)


def next_stamp() -> int:
    """A process-wide unique stamp for the token state of a store. Every change of a store's
    ``pos_map`` (and every new or loaded store) takes a fresh one, so a read plan keyed by the
    stamp can never serve a changed store."""
    return next(_stamps)


# A token-map entry is `HOLE`, a dense row ``r >= 0``, or ``-(slot + 2)`` for a token sealed in
# codebook slot ``slot``. These helpers take ints, tensors and NumPy arrays alike (elementwise).
def sealed_code(slot: Any) -> Any:
    """``pos_map`` value of a token sealed in codebook slot ``slot``."""
    return -(slot + 2)


def is_sealed(code: Any) -> Any:
    """Whether token-map entries ``code`` are sealed tokens."""
    return code <= -2


def is_dense(code: Any) -> Any:
    """Whether token-map entries ``code`` are dense rows."""
    return code >= 0


def slot_of(code: Any) -> Any:
    """The codebook slot of sealed token-map entries ``code``."""
    return -code - 2


@dataclass(frozen=True)
class StoreSpec:
    """Static layout of a store.

    Attributes:
        config, policy: how tokens are quantized and when.
        part_dims: channels of each part (their sum is the cache's last dim).
        roles: ``"key"`` or ``"value"`` per part (picks the bit width).
        dtype: the cache's dtype name (``"bfloat16"``...): dense rows and decoded values.
        slot_tokens: L, tokens per dense slot (0 until the first write fixes it).
        segments: K, codebook slots (0 until the first seal needs them).
        codebook: C, centroid rows per codebook slot.
    """

    config: QVGConfig
    policy: CachePolicy
    part_dims: tuple[int, ...]
    roles: tuple[str, ...]
    dtype: str
    slot_tokens: int = 0
    segments: int = 0
    codebook: int = 1

    def __post_init__(self) -> None:
        if len(self.part_dims) != len(self.roles) or not self.part_dims:
            raise ValueError(f"roles: expected one role per part {self.part_dims}, got {self.roles}")
        for role in self.roles:
            if role not in ROLES:
                raise ValueError(f"role: expected one of {ROLES}, got {role!r}")
        for d in self.part_dims:
            if d % self.config.group_size:
                raise ValueError(f"config.group_size: {self.config.group_size} does not divide the "
                                 f"head dim {d} of a cache part (pass a group size that does, e.g. "
                                 f"qvg_compile.backend(group_size={math.gcd(d, self.config.group_size)}))")
        if self.config.method not in ("qvg", "rtn"):
            raise ValueError(f"config.method: the compressed cache stores qvg or rtn codes, got "
                             f"{self.config.method!r}")

    def __deepcopy__(self, memo: dict) -> "StoreSpec":
        # Immutable: a copy may be this object. Dynamo's guard on a cache's flatten metadata
        # keeps a deep copy and compares it on every compiled call; sharing the object makes
        # that compare an identity check instead of a walk over every field.
        return self

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def stages(self) -> int:
        return self.config.stages if self.config.method == "qvg" else 0

    @cached_property
    def has_zeros(self) -> bool:
        return any(self.config.code_mode_for(role) == "asymmetric" for role in self.roles)

    @property
    def slots(self) -> int:
        return self.policy.dense_chunks if self.slot_tokens else 0

    @property
    def sinks(self) -> int:
        return self.policy.dense_sinks

    @property
    def sink_row(self) -> int:
        """First dense row of the sinks (rows ``[sink_row, sink_row + sinks)`` hold positions
        ``[0, sinks)``)."""
        return self.slots * self.slot_tokens

    @property
    def tail_rows(self) -> int:
        return self.sink_row + self.sinks

    @property
    def segment_tokens(self) -> int:
        """Tokens of one segment sealed from full slots."""
        return self.policy.seal_chunks * self.slot_tokens

    @property
    def channels(self) -> int:
        return sum(self.part_dims)

    @property
    def index_dtype(self) -> torch.dtype:
        """Dtype of ``pos_map`` and ``seg_ids``: int16 when the dense rows and the codes
        ``-(slot + 2)`` of every codebook slot fit, else int32."""
        fits = self.tail_rows <= torch.iinfo(torch.int16).max and self.segments + 2 <= 2 ** 15
        return torch.int16 if fits else torch.int32

    def bits(self, part: int) -> int:
        return self.config.bits_for(self.roles[part])

    def names(self) -> tuple[str, ...]:
        """Array names in op order."""
        return self._names

    @cached_property
    def _names(self) -> tuple[str, ...]:
        return _names(len(self.part_dims), self.has_zeros)

    @cached_property
    def tail_at(self) -> tuple[int, ...]:
        """Index of each part's ``tail`` array in `names`."""
        return tuple(self._names.index(f"tail{p}") for p in range(len(self.part_dims)))

    @cached_property
    def attr_names(self) -> tuple[str, ...]:
        """`names` as `QVGCache` attributes (``_codes0``...), the inner tensors of its flatten."""
        return tuple(f"_{n}" for n in self._names)

    def part_names(self, part: int) -> list[str]:
        """Array names of one part: codes, scales, (zeros,) assign, cents, tail."""
        return [f"{base}{part}" for base in PART_ARRAYS if base != "zeros" or self.has_zeros]

    def shapes(self, lead: Sequence[int], cap: int) -> dict[str, tuple[int, ...]]:
        """Shape of every array of a store with leading sizes ``lead`` and ``cap`` tokens."""
        lead, s = tuple(lead), self.stages
        out: dict[str, tuple[int, ...]] = {}
        for p, d in enumerate(self.part_dims):
            g = d // self.config.group_size
            out[f"codes{p}"] = (*lead, cap, packed_size(d, self.bits(p)))
            out[f"scales{p}"] = (*lead, cap, g)
            if self.has_zeros:
                out[f"zeros{p}"] = (*lead, cap, g)
            out[f"assign{p}"] = (s, *lead, cap)
            out[f"cents{p}"] = (self.segments, s, *lead, self.codebook, d)
            out[f"tail{p}"] = (*lead, self.tail_rows, d)
        out["seg_ids"] = (cap,)
        out["pos_map"] = (cap,)
        out["slots"] = (self.slots, 2)
        out["segs"] = (self.segments, 4)
        out["counters"] = (3,)
        return out

    def dtypes(self) -> dict[str, torch.dtype]:
        out: dict[str, torch.dtype] = {}
        for p in range(len(self.part_dims)):
            out[f"codes{p}"] = torch.uint8
            out[f"scales{p}"] = self.config.torch_scale_dtype
            if self.has_zeros:
                out[f"zeros{p}"] = self.config.torch_scale_dtype
            out[f"assign{p}"] = torch.uint8
            out[f"cents{p}"] = self.config.torch_centroid_dtype
            out[f"tail{p}"] = self.torch_dtype
        out.update(seg_ids=self.index_dtype, pos_map=self.index_dtype, slots=torch.int64, segs=torch.int64,
                   counters=torch.int64)
        return out

    @staticmethod
    def is_host(name: str) -> bool:
        return name in ("pos_map", "slots", "segs", "counters")

    def allocate(self, lead: Sequence[int], cap: int, device: torch.device,
                 reuse: Optional[dict[str, torch.Tensor]] = None) -> list[torch.Tensor]:
        """Fresh arrays for an empty store: every token a hole, every slot and codebook free.
        ``reuse``: arrays of another store taken over as they are (content included) where the
        name, shape and dtype match, so that resizing a store copies only what changes."""
        shapes, dtypes = self.shapes(lead, cap), self.dtypes()
        arrays = []
        for name in self.names():
            old = (reuse or {}).get(name)
            if old is not None and tuple(old.shape) == shapes[name] and old.dtype == dtypes[name]:
                arrays.append(old)
                continue
            where = HOST if self.is_host(name) else device
            t = torch.zeros(shapes[name], dtype=dtypes[name], device=where)
            if name == "pos_map":
                t.fill_(HOLE)
            elif name == "slots":
                t[:, 0] = -1
            elif name == "counters":
                t[LATEST] = -1
                t[STAMP] = next_stamp()
            arrays.append(t)
        return arrays

    def for_parts(self, parts: Sequence[int]) -> "StoreSpec":
        """The spec of a store holding only ``parts`` (first, count) of this one."""
        first, count = int(parts[0]), int(parts[1])
        return dataclasses.replace(self, part_dims=self.part_dims[first:first + count],
                                   roles=self.roles[first:first + count])

    def sized_for(self, slot_tokens: int, cap: int) -> "StoreSpec":
        """The spec once the slot length is known: enough codebook slots to fill ``cap`` tokens
        (never fewer than it has), codebooks sized for a segment of full slots."""
        seg = self.policy.seal_chunks * slot_tokens
        segments = math.ceil(max(cap - self.sinks, 1) / (seg * self.policy.codebook_chunks))
        segments += self.policy.spare_segments
        codebook = self.policy.codebook_size(self.config, min(seg, max(cap, 1)))
        return dataclasses.replace(self, slot_tokens=slot_tokens, segments=max(segments, self.segments),
                                   codebook=max(codebook, self.codebook))

    def released(self) -> "StoreSpec":
        """The spec without dense slots (the tail keeps the sinks only); the policy remembers the
        slot length, so the next write sizes the slots as before."""
        policy = self.policy.replace(chunk_tokens=self.slot_tokens or self.policy.chunk_tokens)
        return dataclasses.replace(self, policy=policy, slot_tokens=0)

    def sized_for_segment(self, tokens: int) -> "StoreSpec":
        """The spec with at least one codebook slot (plus spares) fit for a segment of ``tokens``."""
        codebook = self.policy.codebook_size(self.config, max(tokens, 1))
        return dataclasses.replace(self, segments=max(self.segments, 1 + self.policy.spare_segments),
                                   codebook=max(codebook, self.codebook))

    # --- serialisation -------------------------------------------------------------------------
    @cached_property
    def json(self) -> str:
        """`to_json`, computed once (the ops take it as their static argument)."""
        return self.to_json()

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["config"] = dataclasses.asdict(self.config)
        d["policy"] = dataclasses.asdict(self.policy)
        return json.dumps(d, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "StoreSpec":
        return _from_json(text)


@lru_cache(maxsize=256)
def _from_json(text: str) -> StoreSpec:
    d = json.loads(text)
    d["config"] = QVGConfig(**d["config"])
    d["policy"] = CachePolicy(**d["policy"])
    for key in ("part_dims", "roles"):
        d[key] = tuple(d[key])
    return StoreSpec(**d)


@lru_cache(maxsize=64)
def _names(parts: int, zeros: bool) -> tuple[str, ...]:
    out = [f"{base}{p}" for p in range(parts) for base in PART_ARRAYS if base != "zeros" or zeros]
    return tuple(out) + SHARED_ARRAYS
