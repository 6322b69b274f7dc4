"""One rank of tests/test_sharded_views.py: the engine side of Newton-Schulz on fused projections, without a Trainer.

Each layout (a real tiny model's fused weight and its ``TensorRole.view``, plus a plain and a tall whole matrix) is
orthogonalised on one process (the reference; float32 inputs, Newton-Schulz in float64), then through
:class:`ParallelOrthogonaliser` in the form each engine hands it over: replicated (DDP), a ZeRO-1/2 partition of one
flat buffer (``offsets``), a ZeRO-3 partition of each matrix on its own (``pieces``) and FSDP2 DTensors sharded by
dim 0 (of the stored tensor, transposed or not). Every rank writes ``OUT/rank<r>.json``: {"form layout": max abs
difference from its share of the reference}.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from hf_badm.optim.solves.newton_schulz import WHOLE, MatrixView, orthogonalise, register_matrix_view
from hf_badm.parallel.orthogonalise import ParallelOrthogonaliser, register_matrix_layout
from hf_badm.parallel.zero import ZeroMatrixLayout
from hf_badm.roles import tensor_roles
from families import instantiate, tiny_config
from tiny import tiny_model

# Newton-Schulz in float64 on float32 inputs (the dtype of ZeRO's master partitions): float32 pieces travel exactly in
# the default comm_dtype, so every form must match the reference bit for bit. (float64 pieces would be rounded to
# float32 on the way: about 5e-8 here.)
STEPS, NS_DTYPE = 5, torch.float64
# Parallel orthogonalisers each sharded form goes through: every matrix in one exchange, and one bucket per matrix
# (owners balanced across buckets).
ORTHOGONALISERS = {"": {}, " (bucket per matrix)": {"bucket_numel": 1}}


def phi3_gqa() -> torch.nn.Module:
    """Phi-3 with fewer key/value heads than query heads, so that qkv_proj's parts have unequal sizes."""
    config = tiny_config("phi3")
    config.num_key_value_heads = 2
    return instantiate("phi3", config)


# layout name -> (model builder, parameter name)
LAYOUTS = {
    "gpt2 c_attn": (lambda: tiny_model("gpt2"), "transformer.h.0.attn.c_attn.weight"),
    "phi3 qkv_proj": (phi3_gqa, "model.layers.0.self_attn.qkv_proj.weight"),
    "phi3 gate_up_proj": (phi3_gqa, "model.layers.0.mlp.gate_up_proj.weight"),
    "gpt_neox query_key_value": (lambda: instantiate("gpt_neox", tiny_config("gpt_neox")),
                                 "gpt_neox.layers.0.attention.query_key_value.weight"),
    "gpt_oss experts gate_up_proj": (lambda: tiny_model("gpt_oss"), "model.layers.0.mlp.experts.gate_up_proj"),
}
WHOLE_SHAPES = {"plain": (9, 20), "tall": (33, 10)}  # odd rows: unequal FSDP2 shards


def layouts() -> tuple[list[str], list[torch.Tensor], list[MatrixView]]:
    """Names, weights and views of every layout (each model built once)."""
    models: dict = {}
    names, weights, views = [], [], []
    for name, (build, param) in LAYOUTS.items():
        model = models.setdefault(build, build())
        role = tensor_roles(model)[param]
        assert role.view.sizes is not None, f"{name}: {param} is not split into parts ({role})"
        names.append(name)
        weights.append(dict(model.named_parameters())[param].detach())
        views.append(role.view)
    for name, shape in WHOLE_SHAPES.items():
        names.append(name)
        weights.append(torch.randn(shape))
        views.append(WHOLE)
    return names, weights, views


def diffs(form: str, names: list[str], got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    return {f"{form} {name}": float((g - w).abs().max()) if g.shape == w.shape else math.inf
            for name, g, w in zip(names, got, want)}


def partition_diffs(form: str, names: list[str], got: torch.Tensor, want: torch.Tensor, labels: torch.Tensor
                    ) -> dict[str, float]:
    """Per layout (``labels``: which matrix each element of the partition belongs to, -1 for padding)."""
    error = (got - want).abs() if got.shape == want.shape else torch.full_like(want, math.inf)
    return {f"{form} {name}": float(error[labels == j].max()) if (labels == j).any() else 0.0
            for j, name in [(-1, "padding"), *enumerate(names)]}


def padded_flat(xs: list[torch.Tensor], numel: int) -> torch.Tensor:
    flat = torch.cat([x.reshape(-1) for x in xs])
    return torch.cat([flat, flat.new_zeros(numel - flat.numel())])


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same weights and inputs on every rank
    names, weights, views = layouts()
    inputs = [torch.randn_like(w) for w in weights]
    reference = orthogonalise(inputs, STEPS, NS_DTYPE, views=views)
    shapes = [x.shape for x in inputs]
    numels = [x.numel() for x in inputs]
    labels = [torch.full(shape, j + 1.0) for j, shape in enumerate(shapes)]  # 0: padding
    result: dict[str, float] = {}

    params = [w.clone() for w in weights]
    for p, view in zip(params, views):
        register_matrix_view(p, view)
    result |= diffs("replicated", names, ParallelOrthogonaliser()(params, inputs, STEPS, NS_DTYPE), reference)

    for suffix, settings in ORTHOGONALISERS.items():
        # ZeRO-1/2: the ranks' partitions are consecutive equal slices of one flat buffer of every matrix.
        P = -(-sum(numels) // world)
        offsets = [sum(numels[:j]) for j in range(len(numels))]
        share = lambda xs: padded_flat(xs, P * world)[rank * P:(rank + 1) * P]
        part = share(inputs)
        register_matrix_layout(part, ZeroMatrixLayout(shapes, views, None, P, offsets=offsets))
        (got,) = ParallelOrthogonaliser(**settings)([part], [part], STEPS, NS_DTYPE)
        result |= partition_diffs(f"zero12{suffix}", names, got, share(reference), share(labels) - 1)

        # ZeRO-3: each matrix partitioned on its own (padded); a rank's partition is its pieces, concatenated.
        pieces = [-(-n // world) for n in numels]
        share = lambda xs: torch.cat([padded_flat([x], k * world)[rank * k:(rank + 1) * k] for x, k in zip(xs, pieces)])
        part = share(inputs)
        register_matrix_layout(part, ZeroMatrixLayout(shapes, views, None, part.numel(), pieces=pieces))
        (got,) = ParallelOrthogonaliser(**settings)([part], [part], STEPS, NS_DTYPE)
        result |= partition_diffs(f"zero3{suffix}", names, got, share(reference), share(labels) - 1)

        # FSDP2: every stored tensor sharded by dim 0 (torch.chunk sizes), its view registered on the DTensor param.
        mesh = init_device_mesh("cpu", (world,))
        dparams = [distribute_tensor(w, mesh, [Shard(0)]) for w in weights]
        for p, view in zip(dparams, views):
            register_matrix_view(p, view)
        got = ParallelOrthogonaliser(**settings)(dparams, [distribute_tensor(x, mesh, [Shard(0)]) for x in inputs],
                                                 STEPS, NS_DTYPE)
        result |= diffs(f"fsdp2{suffix}", names, [d.to_local() for d in got],
                        [r.chunk(world, dim=0)[rank] for r in reference])

    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
