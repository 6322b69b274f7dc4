"""Newton-Schulz on several ranks: each whole matrix is orthogonalised on one owner rank, balanced by cost.

Two kinds of input reach ``BADM.orthogonaliser`` in fused mode, and each moves only what it must:

* **Replicated** matrices (DDP): every rank holds every matrix and needs every direction. Each rank orthogonalises
  its own share and one ``all_gather`` per dtype brings the rest: about 1/W of the matmul work per rank.
* **Sharded** matrices (DeepSpeed ZeRO-1/2/3 flat partitions, FSDP2 DTensors): every rank holds a piece of every
  matrix. Per bucket of matrices, one ``all_to_all`` sends each piece to the matrix's owner, the owner
  orthogonalises the whole matrix, and a second ``all_to_all`` (same buffers, reversed) returns each rank the pieces
  of the directions it holds. A rank materialises its own pieces and the matrices it owns, never every matrix.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from torch.utils.weak import WeakIdKeyDictionary

from hf_badm.optim.solves.newton_schulz import MatrixView, mark_partition, matrix_view, orthogonalise

__all__ = ["ParallelOrthogonaliser", "register_matrix_layout", "matrix_layout", "assign_owners", "ns_cost", "check_parallel_settings", "COMM_DTYPES", "DEFAULT_BUCKET_NUMEL"]

# As DeepSpeed's default reduce bucket (reduce_bucket_size = 5e8 elements): the largest set of matrices whose pieces
# one exchange holds at once.
DEFAULT_BUCKET_NUMEL = 500_000_000
COMM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# Each flat partition of whole matrices (an engine's: hf_badm.parallel.zero) with the object that says where its
# matrices are (``matrices(x)`` and ``output(x)``, as :class:`~hf_badm.parallel.zero.ZeroMatrixLayout`).
_MATRIX_LAYOUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register_matrix_layout(p: Tensor, layout: Any) -> None:
    """Declare ``p`` a flat partition of whole matrices, described by ``layout`` (and so a Newton-Schulz tensor)."""
    mark_partition(p)
    _MATRIX_LAYOUTS[p] = layout


def matrix_layout(p: Tensor) -> Any:
    """The layout registered for ``p``, or None."""
    return _MATRIX_LAYOUTS.get(p)


def check_parallel_settings(bucket_numel: int, comm_dtype: str, prefix: str = "") -> None:
    """The settings of :class:`ParallelOrthogonaliser` (also checked by BADMConfig before a run starts)."""
    if comm_dtype not in COMM_DTYPES:
        raise ValueError(f"{prefix}comm_dtype must be one of {tuple(COMM_DTYPES)}, got {comm_dtype!r}")
    if isinstance(bucket_numel, bool) or not isinstance(bucket_numel, int) or bucket_numel < 1:
        raise ValueError(f"{prefix}bucket_numel must be an integer >= 1, got {bucket_numel!r}")


def ns_cost(shape: torch.Size) -> int:
    """Newton-Schulz work of one matrix (or stack of expert matrices), up to a constant: min(m, n)^2 max(m, n)."""
    m, n = shape[-2], shape[-1]
    return math.prod(shape[:-2]) * min(m, n) ** 2 * max(m, n)


def assign_owners(shapes: list[torch.Size], world: int, load: list[int] | None = None) -> list[int]:
    """The rank that orthogonalises each matrix: largest first onto the least-loaded rank (deterministic, so every
    rank computes the same assignment without communicating). ``load`` carries the ranks' work across calls."""
    load = [0] * world if load is None else load
    owners = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-ns_cost(shapes[i]), i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += ns_cost(shapes[i])
    return owners


class ShardedMatrix(NamedTuple):
    """One whole matrix spread over the ranks: ``sizes[r]`` elements on rank r, in rank order (concatenated, they are
    the matrix's row-major elements); ``piece`` is this rank's elements in the input, ``view`` the maps the whole
    matrix holds (its parts are cut on the owner, from the whole) and ``out`` where this rank's elements of its
    direction go (1-D views)."""

    shape: torch.Size
    sizes: list[int]
    piece: Tensor
    view: MatrixView
    out: Tensor


class ParallelOrthogonaliser:
    """``BADM.orthogonaliser`` for fused mode on several data-parallel ranks (see the module docstring).

    Replicas stay bit-identical: each direction is computed once, by its owner, and copied. ``bucket_numel`` bounds
    the elements of the matrices one sharded exchange holds; ``comm_dtype`` ("float32", exact for float32 pieces, or "bfloat16", half
    the bytes) is the dtype their pieces travel in. Not for per-sub-batch mode, where each rank orthogonalises its
    own slots' momenta (its inputs differ from the other ranks')."""

    def __init__(self, group: dist.ProcessGroup | None = None, *, bucket_numel: int = DEFAULT_BUCKET_NUMEL,
                 comm_dtype: str = "float32") -> None:
        check_parallel_settings(bucket_numel, comm_dtype)
        self.group, self.bucket_numel, self.comm_dtype = group, bucket_numel, COMM_DTYPES[comm_dtype]

    @torch.no_grad()
    def __call__(self, params: list[Tensor], inputs: list[Tensor], steps: int, dtype: torch.dtype) -> list[Tensor]:
        outputs: list[Tensor | None] = [None] * len(inputs)
        replicated, sharded = [], []
        for i, (p, x) in enumerate(zip(params, inputs)):
            (sharded if matrix_layout(p) is not None or _is_dtensor(x) else replicated).append(i)
        if replicated:
            done = self._split([inputs[i] for i in replicated], [matrix_view(params[i]) for i in replicated], steps, dtype)
            for i, d in zip(replicated, done):
                outputs[i] = d
        if sharded:
            done = self._exchange([params[i] for i in sharded], [inputs[i] for i in sharded], steps, dtype)
            for i, d in zip(sharded, done):
                outputs[i] = d
        return outputs  # type: ignore[return-value]

    # ------------------------------------------------------------------ replicated matrices (DDP)
    def _split(self, full: list[Tensor], views: list[MatrixView], steps: int, dtype: torch.dtype) -> list[Tensor]:
        """Each rank orthogonalises its share; per (device, dtype) each packs its directions into one flat buffer
        padded to the largest rank's size, and one all_gather moves them all."""
        world = _world(self.group)
        if world == 1:
            return orthogonalise(full, steps, dtype, views=views)
        owners = assign_owners([x.shape for x in full], world)
        rank = dist.get_rank(self.group)
        mine = [i for i, owner in enumerate(owners) if owner == rank]
        done = dict(zip(mine, orthogonalise([full[i] for i in mine], steps, dtype, views=[views[i] for i in mine]))) \
            if mine else {}
        outputs: list[Tensor | None] = [None] * len(full)
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, x in enumerate(full):
            buckets.setdefault((x.device, x.dtype), []).append(i)
        for (device, xdtype), idx in buckets.items():
            per_rank = [[i for i in idx if owners[i] == r] for r in range(world)]
            sizes = [sum(full[i].numel() for i in ids) for ids in per_rank]
            local = torch.zeros(max(sizes), device=device, dtype=xdtype)
            if per_rank[rank]:
                torch.cat([done[i].reshape(-1) for i in per_rank[rank]], out=local[:sizes[rank]])
            gathered = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(gathered, local, group=self.group)
            for r, ids in enumerate(per_rank):
                offset = 0
                for i in ids:
                    outputs[i] = gathered[r][offset:offset + full[i].numel()].view_as(full[i])
                    offset += full[i].numel()
        return outputs  # type: ignore[return-value]

    # ------------------------------------------------------------------ sharded matrices (ZeRO, FSDP2)
    def _exchange(self, params: list[Tensor], inputs: list[Tensor], steps: int, dtype: torch.dtype) -> list[Tensor]:
        """This rank's pieces of the directions of every sharded input, in the input's own form."""
        outputs, matrices, groups = [], [], set()
        for p, x in zip(params, inputs):
            layout = matrix_layout(p) or DTensorLayout(x, matrix_view(p))
            out, out_pieces = layout.output(x)
            matrices += [ShardedMatrix(*m, o) for m, o in zip(layout.matrices(x), out_pieces)]
            outputs.append(out)
            groups.add(layout.group)
        if len(groups) != 1:
            raise ValueError("Newton-Schulz across sharded parameters needs them all on one process group")
        (group,) = groups
        world = _world(group)
        rank = dist.get_rank(group) if world > 1 else 0
        load = [0] * world
        for bucket in _buckets(matrices, self.bucket_numel):
            self._exchange_bucket(bucket, group, world, rank, load, steps, dtype)
        return outputs

    def _exchange_bucket(self, bucket: list[ShardedMatrix], group: Any, world: int, rank: int, load: list[int],
                         steps: int, dtype: torch.dtype) -> None:
        """Pieces to owners (one all_to_all), whole matrices orthogonalised there, directions' pieces back (a second
        all_to_all on the same two buffers, reversed)."""
        owners = assign_owners([m.shape for m in bucket], world, load)
        by_owner = [[m for m, o in zip(bucket, owners) if o == r] for r in range(world)]
        mine = by_owner[rank]
        send_splits = [sum(m.sizes[rank] for m in ms) for ms in by_owner]
        recv_splits = [sum(m.sizes[r] for m in mine) for r in range(world)]
        device = bucket[0].piece.device
        send = torch.cat([m.piece.to(self.comm_dtype) for ms in by_owner for m in ms])
        recv = torch.empty(sum(recv_splits), device=device, dtype=self.comm_dtype)
        _all_to_all(recv, send, recv_splits, send_splits, group, world)
        # recv holds, rank by rank, that rank's pieces of the matrices this rank owns (in bucket order)
        starts = [sum(recv_splits[:r]) for r in range(world)]
        pieces_of: list[list[Tensor]] = []
        for m in mine:
            pieces_of.append([recv[starts[r]:starts[r] + m.sizes[r]] for r in range(world)])
            starts = [start + m.sizes[r] for r, start in enumerate(starts)]
        wholes = [torch.cat(pieces).view(m.shape).to(m.piece.dtype) for m, pieces in zip(mine, pieces_of)]
        directions = orthogonalise(wholes, steps, dtype, views=[m.view for m in mine]) if wholes else []
        for pieces, direction in zip(pieces_of, directions):
            for piece, part in zip(pieces, direction.reshape(-1).split([piece.numel() for piece in pieces])):
                piece.copy_(part)  # the direction's pieces go back where the input's came from
        _all_to_all(send, recv, send_splits, recv_splits, group, world)
        for m, piece in zip([m for ms in by_owner for m in ms], send.split([m.sizes[rank] for ms in by_owner for m in ms])):
            m.out.copy_(piece)


def _world(group: Any) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _all_to_all(out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], group: Any, world: int) -> None:
    if world == 1:
        out.copy_(inp)
    else:
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)


def _buckets(matrices: list[ShardedMatrix], limit: int) -> list[list[ShardedMatrix]]:
    """Consecutive matrices, at most ``limit`` elements a bucket (a larger matrix alone)."""
    out: list[list[ShardedMatrix]] = []
    size = limit
    for m in matrices:
        n = math.prod(m.shape)
        if size + n > limit:
            out.append([])
            size = 0
        out[-1].append(m)
        size += n
    return out


def _is_dtensor(x: Tensor) -> bool:
    return type(x).__name__ == "DTensor"


class DTensorLayout:
    """An FSDP2 parameter: rows sharded over a 1-D mesh (``Shard(0)``, torch.chunk sizes), so the ranks' local
    shards, in rank order, are the matrix's row-major elements."""

    def __init__(self, x: Any, view: MatrixView) -> None:
        from torch.distributed.tensor import Shard

        if not _is_dtensor(x) or x.device_mesh.ndim != 1 or tuple(x.placements) != (Shard(0),):
            raise ValueError("Newton-Schulz on FSDP2 needs parameters sharded by rows on one mesh dimension "
                             f"(Shard(0)), got {getattr(x, 'placements', type(x).__name__)}")
        self.group = x.device_mesh.get_group()
        world, rows = x.device_mesh.size(), x.shape[0]
        chunk = -(-rows // world)
        self.sizes = [max(0, min(chunk, rows - r * chunk)) * math.prod(x.shape[1:]) for r in range(world)]
        self.view = view

    def matrices(self, x: Any) -> list[tuple[torch.Size, list[int], Tensor, MatrixView]]:
        return [(x.shape, self.sizes, x.to_local().reshape(-1), self.view)]

    @staticmethod
    def output(x: Any) -> tuple[Any, list[Tensor]]:
        from torch.distributed.tensor import DTensor

        local = torch.empty_like(x.to_local())
        out = DTensor.from_local(local, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride())
        return out, [local.reshape(-1)]
