"""bench/layer_cost.py: its multiply-add count, the ceiling it prints beside the measured
speed ratios, agrees with what torch's FLOP counter sees the shipped model compute, at
full depth (last layer for [CLS] alone) and at depth 2 (every token, mean head), and on a
2-layer model under each head pooling."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rerankd.engine.loading import load_cross_encoder
from rerankd.engine.shipped import shipped_dir
from tests.helpers import REPO

sys.path.insert(0, str(REPO / "bench"))  # the bench imports its sibling rerank_throughput
_spec = importlib.util.spec_from_file_location("layer_cost", REPO / "bench" / "layer_cost.py")
assert _spec and _spec.loader
lc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lc)


@pytest.mark.parametrize("depth", [None, 2])
def test_the_count_matches_torchs_flop_counter(depth: int | None) -> None:
    model = load_cross_encoder(shipped_dir(lc.TEACHER))
    if depth is not None:  # as served: the depth's LoRA folded into the weights (onnx export)
        model = model.merged(depth)
    cfg = model.config
    batch, width = 3, 40
    ids = torch.randint(1000, 2000, (batch, width))
    mask = torch.ones(batch, width, dtype=torch.long)
    types = torch.zeros(batch, width, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, mask, types, depth=depth)
    seen = counter.get_total_flops() / 2  # a multiply-add is two FLOPs
    layers = depth or cfg.num_layers
    pooling = model.pooling(depth)
    rows = lc.last_rows(
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, pooling
    )
    counted = lc.multiply_adds(
        [(width, rows)] * batch, layers, cfg.hidden_size, cfg.intermediate_size
    )
    # the bench leaves out the heads (pooler + classifier: ~d^2 per pair), nothing else
    head = batch * (cfg.hidden_size**2 + cfg.hidden_size)
    assert counted <= seen <= counted + 2 * head


def test_a_cls_only_last_layer_costs_about_a_sixth_of_a_layer() -> None:
    d, i, n = 384, 1536, 192
    full = lc.multiply_adds([(n, n)], 6, d, i)
    cls = lc.multiply_adds([(n, 1)], 6, d, i)
    one_layer = full / 6
    assert 0.15 < (cls - 5 * one_layer) / one_layer < 0.2


@pytest.mark.parametrize("pooling", ["cls", "query", "mean"])
def test_the_count_follows_the_rows_a_pooling_computes(pooling: str) -> None:
    """A 2-layer model with a [CLS], query-segment or token-mean head, 12 of 40 tokens in
    the query segment: torch's FLOP counter sees what the bench counts."""
    model = load_cross_encoder(shipped_dir("rerankd-tiny-l2"))
    model.set_pooling([2], pooling)
    cfg = model.config
    ids = torch.randint(1000, 2000, (3, 40))
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    types[:, 12:] = 1
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, mask, types)
    seen = counter.get_total_flops() / 2
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    rows = lc.last_rows(batch, pooling)
    assert rows == {"cls": 1, "query": 12, "mean": 40}[pooling]
    counted = lc.multiply_adds([(40, rows)] * 3, 2, cfg.hidden_size, cfg.intermediate_size)
    head = 3 * (cfg.hidden_size**2 + cfg.hidden_size)
    assert counted <= seen <= counted + 2 * head
