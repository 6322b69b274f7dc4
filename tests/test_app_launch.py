"""Launch notes: when a launch that asked for several processes trains in one (the environments the launchers set)."""

from __future__ import annotations

import pytest

from hf_badm.app.launch import single_process_note


@pytest.mark.parametrize("world_size, env, says", [
    (1, {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "started 2 processes"),  # torchrun, no use_cpu
    (2, {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, None),  # the same, one process group
    (1, {"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, None),  # torchrun --nproc_per_node 1
    (1, {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "--cpu"),  # 2 asked
    (1, {"ACCELERATE_USE_CPU": "True"}, None),  # accelerate launch --cpu of one process sets no MASTER_ADDR
    (1, {}, None),  # plain python
])
def test_single_process_note(world_size, env, says):
    note = single_process_note(world_size, env)
    assert note is None if says is None else says in note
