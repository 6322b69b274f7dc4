"""Everything engine-specific about BADM on several ranks: the per-sub-batch rank aggregation, the Newton-Schulz work
split and its all-to-all over sharded matrices, DeepSpeed ZeRO's partition layouts and FSDP2's DTensor shards.
``hf_badm.optim`` knows none of it: it hands its Newton-Schulz inputs, with their parameters, to the orthogonaliser
installed here."""

from hf_badm.parallel.orthogonalise import ParallelOrthogonaliser, assign_owners
from hf_badm.parallel.ranks import all_reduce_aggregator, prepare_for_ranks, world_size
from hf_badm.parallel.shapes import full_shape
from hf_badm.parallel.zero import ZeroMatrixLayout, attach_engine_layouts, attach_zero_layouts

__all__ = ["all_reduce_aggregator", "world_size", "prepare_for_ranks", "assign_owners", "ParallelOrthogonaliser",
           "ZeroMatrixLayout", "attach_zero_layouts", "attach_engine_layouts", "full_shape"]
