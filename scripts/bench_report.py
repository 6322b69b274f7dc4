"""The summary that opens docs/benchmarks.md (one table per question) and the README's generated blocks, from the
result files alone: ``python scripts/bench_report.py`` (``--demo``: first run `hf-badm demo`, recorded in demo.json)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_beyond_muon as bm  # noqa: E402
import bench_common as bc  # noqa: E402

SECTION = "## Summary: which optimizer, how fast, how much memory, how it scales"
README = bc.ROOT / "README.md"
SETTINGS = list(bm.SETTINGS)
# Rows of the "which optimizer" table: (label, optimizer in the real-corpora runs, how to select it).
WHICH = (("AdamW", "adamw_torch", "adamw"), ("Muon (torch's; AdamW elsewhere)", "muon", "muon"),
         ("Muon with QHAdam elsewhere (nu 8/9)", "muon_qhadam", "muon_qhadam"),
         ("BADM newton_schulz, normalized elsewhere (the shipped preset)", "badm_ns_norm", "badm-newton_schulz"),
         ("BADM newton_schulz, ns_lr_scale=match_rms_adamw", "badm_ns_norm_rms", "badm-newton_schulz + solve_settings"))
STEP_ROWS = (("BADM fused (the paper's)", "badm", "badm"), ("BADM normalized", "badm_norm", "badm_norm"),
             ("BADM newton_schulz, Newton-Schulz in float32", "badm_ns", "badm_ns_fp32"),
             ("BADM newton_schulz, Newton-Schulz in bfloat16", "badm_ns_bfloat16", "badm_ns"),
             ("Muon (torch's, bfloat16; AdamW elsewhere)", "muon", "muon"), ("AdamW (foreach)", "adamw", "adamw"),
             ("AdamW (fused)", None, "adamw_fused"), ("SGD + momentum", "sgd", None))


def load(name: str) -> dict[str, Any]:
    return json.loads((bc.RESULTS / name).read_text())


def link(name: str) -> str:
    return f"[`results/{name}`](results/{name})"


def which_table(rep: bm.Report) -> str:
    rows = []
    for label, o, _ in WHICH:
        chosen = rep.chosen(o)
        setting, gm = (rep.describe(chosen[0]), f"{chosen[1]:.2f}x") if chosen else ("–", "–")
        rows.append([label, setting, *(f"{bc.fmt(rep.geomean(o, t, s), '.2f')}x" for t, s in SETTINGS), gm])
    return "\n".join(bc.md_table(["optimizer", "setting (best over all 12 places)", *(f"{t} {s}" for t, s in SETTINGS),
                                  "all 12 places, that one setting"], "ll" + "r" * (len(SETTINGS) + 1), rows))


def step_tables() -> tuple[str, str]:
    cpu, gpu = load("step.json"), load("gpu.json")["parts"]["step_time"]
    cpu_rows, gpu_rows = ({r["optimizer"]: r for r in d["rows"] if "state_vs_adamw" in r} for d in (cpu, gpu))
    per_sub_batch = next(r for r in cpu["rows"] if r["label"].startswith("BADM per_sub_batch total"))
    s4 = next(r for r in cpu["rows"] if r["label"] == "BADM per_sub_batch step()")
    times, memory = [], []
    for label, c, g in STEP_ROWS:
        rc, rg = cpu_rows.get(c), gpu_rows.get(g)
        cpu_cells, gpu_cells = ([bc.fmt(r and r["median_ms"], ".1f"), bc.ratio(r and r["time_vs_adamw"])]
                                for r in (rc, rg))
        times.append([label, *cpu_cells, *gpu_cells])
        if rc and c not in ("badm_ns_bfloat16",):
            short = label.split(", Newton")[0].replace(" (torch's, bfloat16; AdamW elsewhere)", " + AdamW")
            memory.append([short, f"{rc['state_vs_adamw']:.2f}x", f"{rc['state_vs_muon']:.2f}x",
                           f"{rc['state_bytes'] / 2**20:.1f}"])
    times.append(["BADM per_sub_batch (S = 4): 4 absorb_sub_batch() + step()", f"{per_sub_batch['median_ms']:.1f}",
                  f"{per_sub_batch['time_vs_adamw']:.2f}x", "–", "–"])
    memory.insert(1, ["BADM per_sub_batch (S = 4: 4 duals + 1 aggregate)", f"{s4['state_vs_adamw']:.2f}x",
                      f"{s4['state_vs_muon']:.2f}x", f"{s4['state_bytes'] / 2**20:.1f}"])
    return ("\n".join(bc.md_table(["optimizer", "CPU, 24.7M parameters: ms", "vs AdamW (foreach)", "H200, 124M: ms",
                                   "vs AdamW (fused)"], "lrrrr", times)),
            "\n".join(bc.md_table(["optimizer", "state / AdamW's", "state / Muon + AdamW's",
                                   "state MiB at 24.7M parameters"], "lrrr", memory)))


def ranks_table() -> str:
    comm, ranks, sharded = load("comm.json"), load("ns_ranks.json")["rows"], load("ns_sharded.json")["rows"]
    params = 4 * comm["params"]
    rows = [[mode, comm["world"], "payload each rank sends per step / parameter bytes",
             f"{sum(b for _, b in calls) / comm['steps'] / params:.2f}x"] for mode, calls in comm["modes"].items()]
    one = next(r for r in ranks if r["world"] == 1 and r["threads"] == 1)
    rows += [[f"BADM newton_schulz, DDP (work split), rank {r['rank']}", 2, "Newton-Schulz FLOPs / 1 rank's (step "
              f"{r['median_ms']:.0f} ms vs {one['median_ms']:.0f} ms on 1 rank)", f"{r['flops'] / one['flops']:.2f}x"]
             for r in ranks if r["world"] == 2]
    for engine, name in (("zero3", "DeepSpeed ZeRO-3"), ("fsdp2", "FSDP2")):
        for world in (2, 4):
            ratio = max(r["ratio"] for r in sharded if (r["engine"], r["world"]) == (engine, world))
            rows.append([f"BADM newton_schulz, {name}", world, "bytes in the step's collectives / the rank's own fp32 "
                         "share (largest rank)", f"{ratio:.2f}x"])
    return "\n".join(bc.md_table(["setting", "ranks", "what is measured", "value"], "lrlr", rows))


def split_note(docs: str = "") -> str:
    """The shipped newton_schulz since hf_badm.roles against torch's Muon, both run on one machine (the rows above
    predate roles and ran on another); ``docs``: the path to docs/ from where the note is read."""
    rep = bm.load(bc.RESULTS / "real-corpora" / "split")
    keys = list(bm.CORPORA)
    gms = {size: rep.row([rep.point("badm_ns_norm_parts", size, k) for k in keys], size, keys)[1]
           for size in ("tiny", "small")}
    done = ", ".join(f"BPE {size} {bc.fmt(gm, '.2f')}x" for size, gm in gms.items() if gm is not None)
    return ("The newton_schulz rows above ran before `hf_badm.roles` (GPT-2's `c_attn` orthogonalised whole, its "
            "Conv1D weights scaled by their stored shape). The shipped default since then (`c_attn` split into Q, K, "
            "V; Conv1D scaled as the out x in map), with torch's Muon run again beside it on one machine: "
            f"{done or 'not yet run'} of that Muon's steps ([Fused projections]({docs and docs + 'benchmarks.md'}"
            f"#fused-projections-split-into-parts-whole-or-per-head-bpe-tokens), "
            f"[`{docs}results/real-corpora/split/`]({docs}results/real-corpora/split/)).\n")


def step_shares() -> str:
    """Each optimizer's share of an end-to-end training step, lowest to highest over the model sizes (the medians of
    bench_throughput's table), from throughput.json; per-sub-batch BADM left out (its absorbs fall outside the timed
    ``step()``)."""
    import bench_throughput as bt

    runs = load("throughput.json")["runs"]
    opts = [o for o in bt.OPTIMIZERS if o != "badm_s4"]
    by_size = [bt.medians(runs, size, opts, runs[0]["steps"], runs[0]["device"]) for size in ("tiny", "small")]
    return ", ".join(f"{bt.OPTIMIZERS[o][0]} {min(v) * 100:.1f}–{max(v) * 100:.1f}%" for o in opts
                     if (v := [med[o]["opt_share"] for med in by_size if o in med]))


def summary() -> str:
    rep = bm.load()
    time_table, mem_table = step_tables()
    return "\n".join([
        f"{SECTION}\n",
        "Generated by `python scripts/bench_report.py` from the result files; each table's sweep, protocol and "
        "machine are in the section it links.\n",
        "### Which optimizer: steps to tuned Muon's final held-out loss, as a fraction of Muon's steps\n",
        "Real text (three corpora gathered at run time, GPT-2 tiny 300 steps and small 150 steps, BPE and byte-level "
        "tokens, 2 seeds; below 1x is faster than tuned Muon). Each column: the geometric mean over the three corpora "
        "of each optimizer at its best point per corpus; the last column: the one setting that is best over all 12 "
        f"places, run unchanged at each. Details: [Real corpora](#real-corpora-badm-beyond-muon), {link('real-corpora/')}.\n",
        which_table(rep), "", split_note(),
        "The paper's BADM (plain, fused) was swept on the built-in corpus only, where AdamW reaches its final loss in "
        "about a third of the steps ([Convergence](#convergence-pre-training-sweeps-and-speed-up-vs-adamw)).\n",
        "### How fast per step: one `optimizer.step()`, median\n",
        f"Random gradients, all optimizers interleaved ([Optimizer step](#optimizer-step-time-and-state-memory), "
        f"{link('step.json')}; the H200 column: [GPU check](#gpu-check), {link('gpu.json')}). End to end, the "
        f"optimizer's share of a training step at these sizes ([Throughput](#throughput-and-memory-end-to-end"
        f"-trainer-steps), {link('throughput.json')}): {step_shares()}.\n",
        time_table, "",
        "### How much memory: optimizer state\n",
        f"Bytes of the tensors each optimizer keeps ({link('step.json')}).\n",
        mem_table, "",
        "### How it scales across ranks\n",
        f"Measured on CPU ranks: [Communication per step](#communication-per-step) ({link('comm.json')}), "
        f"[Newton-Schulz across ranks](#newton-schulz-across-ranks-the-work-split-of-fused-newton_schulz) "
        f"({link('ns_ranks.json')}) and the sharded engines (docs/distributed.md, {link('ns_sharded.json')}).\n",
        ranks_table(), ""])


def demo_table() -> str:
    from hf_badm.app.cli import comparison_table

    demo = load("demo.json")
    return ("```text\n" + comparison_table(demo["runs"]) + "\n```\n\n"
            f"(`{demo['command']}` on {demo['machine']['cpu']}, {demo['machine']['cores']} cores, "
            f"{demo['machine']['date']}, commit {demo['commit']}, 1-minute load average {demo['load_1min']:.1f} before it: "
            f"{demo['wall_s']:.0f} s in all; [`docs/results/demo.json`](docs/results/demo.json))")


def readme_blocks() -> dict[str, str]:
    rep = bm.load()
    return {"which": which_table(rep) + "\n\n" + split_note("docs/").rstrip(), "demo": demo_table()}


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    """Replace what lies between ``<!-- bench_report: NAME -->`` and ``<!-- /bench_report -->`` for each block."""
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- bench_report: {name} -->\n).*?(<!-- /bench_report -->)", re.DOTALL)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no block '<!-- bench_report: {name} -->'")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text, count=1)
    return text


def run_demo() -> None:
    """`hf-badm demo` as the README runs it, recorded in docs/results/demo.json (the tables it prints, its wall time)."""
    with tempfile.TemporaryDirectory() as tmp:
        load_before, start = bc.load(), time.perf_counter()
        subprocess.run([sys.executable, "-m", "hf_badm", "demo", "--output_dir", tmp], check=True)
        wall = time.perf_counter() - start
        runs = json.loads((Path(tmp) / "comparison.json").read_text())
    keep = ("eval_loss", "exact_match", "tokens_per_second", "peak_memory_mb", "train_runtime")
    slim = {name: {"recipe": {"learning_rate": m["recipe"]["learning_rate"]},
                   "log_history": [h for h in m["log_history"] if "loss" in h][-1:], **{k: m.get(k) for k in keep}}
            for name, m in runs.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=bc.ROOT, capture_output=True, text=True).stdout
    bc.write_json(bc.RESULTS / "demo.json", {"command": "hf-badm demo", "machine": bc.machine(), "wall_s": wall,
                                             "load_1min": load_before, "commit": commit.strip() or "unknown", "runs": slim})


def main(argv: list[str] | None = None) -> None:
    p = bc.parser(__doc__)
    p.add_argument("--demo", action="store_true", help="run `hf-badm demo` first and record it (about a minute)")
    p.add_argument("--docs", type=Path, default=bc.DOCS)
    p.add_argument("--readme", type=Path, default=README)
    a = p.parse_args(argv)
    bc.quiet()
    if a.demo:
        run_demo()
    text = summary()
    doc = a.docs.read_text()
    if SECTION not in doc:  # the summary opens the file: insert it after the title
        title, _, rest = doc.partition("\n\n")
        doc = f"{title}\n\n{text}\n{rest}"
        a.docs.write_text(doc)
    bc.write_section(a.docs, SECTION, text)
    a.readme.write_text(replace_blocks(a.readme.read_text(), readme_blocks()))
    print(text)


if __name__ == "__main__":
    main()
