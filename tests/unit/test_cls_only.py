"""The last layer computes [CLS] alone when the head reads [CLS] alone, with the same logits.

Reference: the head applied to the backbone's full hidden states (every token through every
layer), on tiny random BERT and RoBERTa models, with padding, at full and partial depth,
with a depth's LoRA compensation; a mean-pooled depth, which must keep every token; and a
query-pooled depth, which computes the batch's longest query segment and averages each
row's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rerankd.engine.loading import load_cross_encoder
from rerankd.engine.models.bert import CrossEncoder
from tests.helpers import write_lora_checkpoint, write_tiny_checkpoint


def _batch(segments: bool = True) -> dict[str, torch.Tensor]:
    """Four pairs, two of them padded; token types 0/1 unless `segments` is off (RoBERTa)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (4, 17), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[3, 5:] = 0
    types = torch.zeros_like(ids)
    types[:, 8:] = int(segments)
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types * mask}


def _reference(model: CrossEncoder, batch: dict[str, torch.Tensor], depth: int | None):
    hidden = model.encode(**batch, depth=depth)
    return model.head(hidden, depth, batch["attention_mask"])


def _last_layer_rows(model: CrossEncoder, batch: dict[str, torch.Tensor], depth: int | None):
    """Logits, and how many positions the last layer run fed its feed-forward."""
    layers = model.backbone.encoder.layer[: depth or len(model.backbone.encoder.layer)]
    seen: list[int] = []
    hook = layers[-1].intermediate.dense.register_forward_hook(
        lambda _m, args, _out: seen.append(args[0].shape[1])
    )
    try:
        logits = model(**batch, depth=depth)
    finally:
        hook.remove()
    return logits, seen


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_cls_heads_run_the_last_layer_for_cls_only(model_type: str, tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(tmp_path / "m", layers=3, model_type=model_type)
    model = load_cross_encoder(folder).eval()
    batch = _batch(segments=model_type == "bert")
    with torch.inference_mode():
        for depth in (None, 2, 1):
            logits, rows = _last_layer_rows(model, batch, depth)
            assert rows == [1]
            torch.testing.assert_close(
                logits, _reference(model, batch, depth), rtol=1e-5, atol=1e-6
            )


def test_same_logits_with_depth_compensation(tmp_path: Path) -> None:
    folder = write_lora_checkpoint(tmp_path / "lora", layers=4, rank=2, alpha=3.0)
    model = load_cross_encoder(folder).eval()
    batch = _batch()
    with torch.inference_mode():
        for depth in (1, 3, None):
            logits, rows = _last_layer_rows(model, batch, depth)
            assert rows == [1]
            torch.testing.assert_close(
                logits, _reference(model, batch, depth), rtol=1e-5, atol=1e-6
            )


def test_mean_pooled_depths_run_every_token(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(tmp_path / "m", layers=3)
    model = load_cross_encoder(folder).eval()
    model.set_pooling([2], "mean")
    batch = _batch()
    with torch.inference_mode():
        logits, rows = _last_layer_rows(model, batch, 2)
        assert rows == [batch["input_ids"].shape[1]]
        torch.testing.assert_close(logits, _reference(model, batch, 2))
        # the other depths still read [CLS]
        assert _last_layer_rows(model, batch, None)[1] == [1]


def _segment_mean_reference(
    model: CrossEncoder, hidden: torch.Tensor, mask: torch.Tensor, segment: torch.Tensor, depth
):
    """The head on the mean of each row's first `segment[b]` kept states (every token run)."""
    first = torch.arange(hidden.shape[1])[None, :] < segment[:, None]
    return model.head(hidden, depth, mask & first)


def test_query_pooled_depths_run_the_query_segment_alone(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(tmp_path / "m", layers=3)
    model = load_cross_encoder(folder).eval()
    model.set_pooling([2], "query")
    batch = _batch()
    segment = (batch["attention_mask"].bool() & (batch["token_type_ids"] == 0)).sum(dim=1)
    assert segment.tolist() == [8, 8, 8, 5]
    with torch.inference_mode():
        logits, rows = _last_layer_rows(model, batch, 2)
        assert rows == [8]  # the longest query segment, not the 17 positions
        hidden = model.encode(**batch, depth=2)
        mask = batch["attention_mask"].bool()
        reference = _segment_mean_reference(model, hidden, mask, segment, 2)
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-6)
        # not the mean over every token, which the head read before
        assert not torch.allclose(logits, _reference(model, batch, 2), atol=1e-4)
        assert _last_layer_rows(model, batch, None)[1] == [1]
        # a batch of short query segments computes fewer rows
        short = {k: v[3:] for k, v in batch.items()}
        assert _last_layer_rows(model, short, 2)[1] == [5]


def test_query_pooling_needs_a_bert_head(tmp_path: Path) -> None:
    model = load_cross_encoder(write_tiny_checkpoint(tmp_path / "r", model_type="roberta"))
    with pytest.raises(ValueError, match="BERT"):
        model.set_pooling([2], "query")
    with pytest.raises(ValueError, match="pooling must be one of"):
        load_cross_encoder(write_tiny_checkpoint(tmp_path / "b")).set_pooling([1], "max")


def test_gradients_match_the_full_computation(tmp_path: Path) -> None:
    """Training calls the same forward: the skipped rows never reached the loss."""
    folder = write_tiny_checkpoint(tmp_path / "m", layers=2)
    batch = _batch()
    grads = []
    for full in (False, True):
        model = load_cross_encoder(folder).train()
        model.requires_grad_(True)
        torch.manual_seed(0)  # the same dropout masks where dropout is on
        logits = _reference(model, batch, None) if full else model(**batch)
        logits.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_jinabert_runs_its_last_layer_for_cls_only(tmp_path: Path) -> None:
    """JinaBERT always reads [CLS]; its ALiBi bias row for [CLS] must come along (the logits
    against the float64 reference are checked in test_jina)."""
    from tests.unit.test_jina import VOCAB, jina_config, write_jina_checkpoint

    folder = tmp_path / "jina"
    write_jina_checkpoint(folder, jina_config())
    model = load_cross_encoder(folder).eval()
    ids = torch.randint(5, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    seen: list[int] = []
    last = model.backbone.encoder.layer[-1].mlp.gated_layers
    hook = last.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    with torch.inference_mode():
        logits = model(**batch)
        hook.remove()
        hidden = model.bert(**batch)
        reference = model.classifier(model.bert.pooler(hidden))[:, 0]
    assert seen == [1]
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("pooling", "rows"), [("cls", 1), ("query", 8)])
def test_pruned_forward_runs_its_last_layer_for_the_heads_rows(
    tmp_path: Path, pooling: str, rows: int
) -> None:
    """Token pruning still picks the last layer's keys and values; its queries are [CLS],
    or the query segment, which pruning protects and keeps in order, so it stays each
    row's prefix and the head averages it."""
    folder = write_tiny_checkpoint(tmp_path / "m", layers=3)
    model = load_cross_encoder(folder).eval()
    model.set_pooling([3], pooling)
    batch = _batch()
    protected = batch["attention_mask"].bool() & (batch["token_type_ids"] == 0)
    keep = (1.0, 0.5, 0.5)
    seen: list[int] = []
    last = model.backbone.encoder.layer[2].intermediate.dense
    hook = last.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    with torch.inference_mode():
        logits = model.forward_pruned(**batch, keep=keep, protected=protected)
        hook.remove()
        hidden, mask = model.backbone.forward_pruned(**batch, keep=keep, protected=protected)
        if pooling == "query":
            reference = _segment_mean_reference(model, hidden, mask, protected.sum(dim=1), 3)
        else:
            reference = model.head(hidden, len(keep), mask)
    assert seen == [rows]
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-6)
