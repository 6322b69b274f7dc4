"""`hf-badm compare` runs each peer of hf_badm.peers beside the BADM solve it is the peer of: NorMuon + AdamW beside
BADM's normuon, Muon + QHAdam beside newton_schulz with normalized elsewhere."""

from __future__ import annotations

import json

from hf_badm.app.learning_rates import COMPARE_LEARNING_RATES


PAIRS = [("normuon", "normuon"), ("muon_qhadam", "newton_schulz")]  # (peer, the BADM solve it is the peer of)


def test_compare_runs_each_peer_beside_its_badm_solve(compared):
    """Each pair in the one compare run of conftest.py (one interpreter, one data set-up)."""
    out, _ = compared
    table = (out / "comparison.md").read_text()
    runs = json.loads((out / "comparison.json").read_text())
    for peer, solve in PAIRS:
        ours = f"badm-{solve}"
        assert f"| {peer} | {COMPARE_LEARNING_RATES[peer]:g} |" in table
        assert f"| {ours} | {COMPARE_LEARNING_RATES[ours]:g} |" in table
        assert runs[peer]["optimizer"] == peer and runs[ours]["recipe"]["badm"]["preconditioner"] == solve
        assert runs[peer]["eval_loss"] > 0 and runs[ours]["eval_loss"] > 0


def test_qhadam_nu_and_adam_beta1_reach_the_muon_qhadam_peer(tmp_path):
    """`hf-badm train --optimizer muon_qhadam` hands qhadam_nu and adam_beta1 to QHAdam on the other tensors (the peer
    of BADM's normalized solve at another rho/sigma); the checkpoint's optimizer state says what ran."""
    import torch

    from test_cli import train_here

    out = tmp_path / "run"
    assert train_here(out, "--optimizer", "muon_qhadam", "--qhadam_nu", "0.75", "--adam_beta1", "0.8", "--max_steps",
                      "1", "--save_steps", "1") == 0
    groups = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=True)["param_groups"]
    qhadam = [g for g in groups if g["optimizer"] == "qhadam"]
    assert qhadam and all(tuple(g["nus"]) == (0.75, 1.0) and tuple(g["betas"])[0] == 0.8 for g in qhadam)
