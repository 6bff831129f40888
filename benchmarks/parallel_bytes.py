"""On paper: the bytes each rank sends per decoded token with dsv3's tensor + expert-parallel layout, and the
bound that puts on tokens/s for a given network between the nodes.

    python benchmarks/parallel_bytes.py                       DeepSeek-V3 (tests/data/deepseek-v3-hub.json),
                                                              2 nodes x 8 GPUs, 100 and 400 Gb/s
    python benchmarks/parallel_bytes.py --nodes 1 --gpus 8 --config path/to/config.json

The layout (dsv3/model/parallel.py): per decoded token and per sequence the collectives are
    embedding      1 all-reduce of the hidden state [D]           (vocabulary-parallel lookup)
    each layer     1 all-reduce [D] after o_proj (row-parallel)   (attention, heads split)
                   1 all-reduce [D] after the MLP / MoE           (dense: down_proj row-parallel; MoE: shared
                                                                   expert's share + own experts' sum, one reduce)
    LM head        1 all-gather of the logits [V]                 (vocabulary-parallel)
so 1 + 2L all-reduces of D values and one all-gather of V values. A ring all-reduce of S bytes over W ranks has
every rank send 2(W-1)/W * S; a ring all-gather of a total S has every rank send (W-1)/W * S.

What crosses the network between nodes (the slow link; NVLink inside a node is taken as free here):
    flat ring over all W = nodes*gpus ranks: the ring crosses each node boundary once per direction, and the
        rank at the boundary sends its full share over it: 2(W-1)/W * S per all-reduce, (W-1)/W * S per gather;
    hierarchical (NCCL's tree/"ring of rings" across nodes, reduce-scatter inside the node first): each node's
        link carries 2(N-1)/N * S per all-reduce and (N-1)/N * S per gather, N = nodes.
Bandwidth bound: tokens/s <= link bytes per second / bytes per token over the link (aggregate over a batch:
the bytes grow with the batch). Latency bound (batch 1): each collective also costs a fixed time per step,
`--latency-us` per inter-node step; a ring all-reduce has 2(W-1) steps in series, the hierarchical one 2(N-1)
inter-node steps (plus intra-node steps, taken as free). Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
V3_CONFIG = REPO / "tests" / "data" / "deepseek-v3-hub.json"
DTYPE_BYTES = {"bf16": 2, "fp32": 4}


def per_token(config: dict, nodes: int, gpus: int, reduce_bytes: int, moe_reduce_bytes: int,
              logits_bytes: int) -> dict:
    """Bytes per decoded token (one sequence): sent by each rank, and over one inter-node link (flat and
    hierarchical), plus the number of collectives and the inter-node steps in series."""
    d, v, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    dense = min(config.get("first_k_dense_replace", 0), layers)
    w = nodes * gpus
    # all-reduces: embedding + attention per layer in the model dtype; MLP in the model dtype, MoE sums maybe fp32
    reduces = [d * reduce_bytes] * (1 + layers + dense) + [d * moe_reduce_bytes] * (layers - dense)
    gather = v * logits_bytes
    ring_reduce, ring_gather = 2 * (w - 1) / w, (w - 1) / w
    sent_per_rank = ring_reduce * sum(reduces) + ring_gather * gather
    flat_link = sent_per_rank if nodes > 1 else 0.0
    hier_link = (2 * (nodes - 1) / nodes * sum(reduces) + (nodes - 1) / nodes * gather) if nodes > 1 else 0.0
    collectives = len(reduces) + 1
    return dict(world=w, all_reduces=len(reduces), all_gathers=1, reduce_bytes_total=sum(reduces),
                gather_bytes=gather, sent_per_rank=sent_per_rank, flat_link=flat_link, hier_link=hier_link,
                flat_steps=collectives * 2 * (w - 1) if nodes > 1 else 0,
                hier_steps=collectives * 2 * (nodes - 1))


def bound(link_bytes: float, steps: int, gbit_s: float, latency_us: float) -> float:
    """Tokens/s at most: bytes over the link at `gbit_s`, plus `steps` latencies of `latency_us` each."""
    seconds = link_bytes / (gbit_s * 1e9 / 8) + steps * latency_us * 1e-6
    return float("inf") if seconds == 0 else 1 / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=V3_CONFIG)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--gpus", type=int, default=8, help="processes (GPUs) per node")
    p.add_argument("--reduce-dtype", choices=DTYPE_BYTES, default="bf16", help="attention / dense all-reduces")
    p.add_argument("--moe-reduce-dtype", choices=DTYPE_BYTES, default="bf16", help="MoE all-reduces")
    p.add_argument("--logits-dtype", choices=DTYPE_BYTES, default="bf16", help="the LM head's all-gather")
    p.add_argument("--gbits", type=float, nargs="+", default=[100.0, 400.0], help="inter-node link, Gb/s")
    p.add_argument("--latency-us", type=float, default=10.0, help="per inter-node step, for the latency rows")
    args = p.parse_args()
    config = json.loads(args.config.read_text())
    rows = []
    for moe_dtype in sorted({args.moe_reduce_dtype, "fp32"}, key=list(DTYPE_BYTES).index):
        t = per_token(config, args.nodes, args.gpus, DTYPE_BYTES[args.reduce_dtype], DTYPE_BYTES[moe_dtype],
                      DTYPE_BYTES[args.logits_dtype])
        for gbit in args.gbits:
            rows.append(dict(moe_reduce=moe_dtype, gbits=gbit, **t,
                             flat_bw=bound(t["flat_link"], 0, gbit, 0), hier_bw=bound(t["hier_link"], 0, gbit, 0),
                             flat_lat=bound(t["flat_link"], t["flat_steps"], gbit, args.latency_us),
                             hier_lat=bound(t["hier_link"], t["hier_steps"], gbit, args.latency_us)))
    r0 = rows[0]
    print(f"{args.config.name}: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, vocab "
          f"{config['vocab_size']}; {args.nodes} node(s) x {args.gpus} = {r0['world']} ranks")
    print(f"per decoded token: {r0['all_reduces']} all-reduces of the hidden state + 1 all-gather of the logits "
          f"({args.logits_dtype})")
    print(f"{'MoE sum':>7} {'Gb/s':>5} {'sent/rank':>10} {'flat link':>10} {'hier link':>10} "
          f"{'flat tok/s':>11} {'hier tok/s':>11} {'flat+lat':>9} {'hier+lat':>9}")
    for r in rows:
        mb = {k: r[k] / 1e6 for k in ("sent_per_rank", "flat_link", "hier_link")}
        print(f"{r['moe_reduce']:>7} {r['gbits']:>5.0f} {mb['sent_per_rank']:>8.2f}MB {mb['flat_link']:>8.2f}MB "
              f"{mb['hier_link']:>8.2f}MB {r['flat_bw']:>11.0f} {r['hier_bw']:>11.0f} {r['flat_lat']:>9.0f} "
              f"{r['hier_lat']:>9.0f}")
    print(f"(tok/s: bandwidth bound, latency ignored, aggregate over a batch; +lat: batch 1 with "
          f"{args.latency_us:g} us per inter-node step: {r0['flat_steps']} steps flat, {r0['hier_steps']} "
          "hierarchical; intra-node steps taken as free)")
    print(json.dumps(dict(config=args.config.name, nodes=args.nodes, gpus=args.gpus, latency_us=args.latency_us,
                          rows=rows)))


if __name__ == "__main__":
    main()
