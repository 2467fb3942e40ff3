"""rerankd's shipped rerankers: they load by name, rank a relevant passage first, and read
long documents whole (a passage past token 512 counts with long_docs="max")."""

from __future__ import annotations

import pytest
import torch

from rerankd.engine.factory import load_reranker
from rerankd.engine.loading import lora_meta
from rerankd.engine.shipped import DEFAULT_RERANKER, SHIPPED
from rerankd.types import Document, LongDocs, RerankOptions

QUERY = "Vitamin B12 deficiency increases blood levels of homocysteine."
PASSAGE = (
    "In a cohort of 1,200 adults, low serum vitamin B12 (cobalamin) was associated with "
    "elevated plasma homocysteine concentrations, and homocysteine fell after B12 "
    "supplementation, showing that B12 deficiency raises homocysteine levels."
)
# Near misses: on topic, but none says that B12 deficiency raises homocysteine.
OTHERS = [
    "Vitamin B12 deficiency causes anemia and neurological symptoms in older adults.",
    "Elevated plasma homocysteine is a risk factor for cardiovascular disease and stroke.",
    "Folic acid supplementation lowers plasma homocysteine in patients with coronary disease.",
    "Serum vitamin B12 levels were measured in 500 elderly patients with cognitive decline.",
    "Homocysteine levels rise with age and with impaired kidney function.",
]
# Off-topic filler, long enough to push the passage past token 512.
FILLER = " ".join(
    f"Section {i}: the railway line was extended across the valley in stages, with new "
    "stations, bridges and signal boxes built by local contractors over several years."
    for i in range(30)
)


@pytest.fixture(scope="module", params=SHIPPED)
def reranker(request):
    model = load_reranker(request.param, backend="torch")
    yield model
    model.close()


def test_the_default_is_the_matryoshka_minilm() -> None:
    from rerankd.server.config import DEFAULT_MODEL

    assert DEFAULT_MODEL == DEFAULT_RERANKER == "rerankd-minilm-l6"


def test_a_relevant_passage_ranks_first(reranker) -> None:
    docs = [Document(f"o{i}", t) for i, t in enumerate(OTHERS)] + [Document("rel", PASSAGE)]
    resp = reranker.rerank(QUERY, docs)
    assert resp.results[0].id == "rel", [(r.id, round(r.score, 3)) for r in resp.results]


def test_a_passage_past_token_512_counts_only_when_read_whole(reranker) -> None:
    long_doc = f"{FILLER} {PASSAGE}"
    tok = reranker.encoder.tokenizer
    filler_tokens = len(tok.encode(FILLER, add_special_tokens=False).ids)
    assert filler_tokens > 512  # the passage starts past token 512
    docs = [Document(f"o{i}", t) for i, t in enumerate(OTHERS)] + [Document("long", long_doc)]
    # the model's own default length (the 192 tokens it was trained on): a 512-token window
    # that is almost all filler would dilute the passage below the near misses
    assert reranker.info.default_max_length == 192
    whole = reranker.rerank(QUERY, docs, options=RerankOptions(long_docs=LongDocs.MAX))
    first = reranker.rerank(QUERY, docs, options=RerankOptions(long_docs=LongDocs.TRUNCATE))
    read_whole, read_first = (
        next(r.score for r in x.results if r.id == "long") for x in (whole, first)
    )
    assert read_whole > read_first + 1.0, (read_whole, read_first)  # the passage counts
    assert first.results[0].id != "long", [(r.id, round(r.score, 3)) for r in first.results]
    assert whole.tokens > first.tokens
    if reranker.name == DEFAULT_RERANKER:  # the default also ranks it above the near misses
        assert whole.results[0].id == "long", [(r.id, round(r.score, 3)) for r in whole.results]
    # (rerankd-tiny-l2, two layers, puts one near miss above it: see its model card)


def test_the_default_compensates_token_pruning() -> None:
    """rerankd-minilm-l6 carries horizontal LoRA (`lora_keep`), which the engine applies to
    pruned requests: with half the tokens kept from layer 2 on, the relevant passage still
    ranks first. (Its phase-3 weights, the same model without those updates, rank it last
    of the six at keep 0.5; the card has the figures on TREC DL 2019 and CISI.)"""
    model = load_reranker(DEFAULT_RERANKER, backend="torch")
    try:
        assert (lora_meta(model.folder) or {}).get("horizontal")
        docs = [Document(f"o{i}", t) for i, t in enumerate(OTHERS)] + [Document("rel", PASSAGE)]
        pruned = model.rerank(QUERY, docs, options=RerankOptions(keep_ratio=0.5))
        assert pruned.results[0].id == "rel", [(r.id, round(r.score, 3)) for r in pruned.results]
    finally:
        model.close()


def test_the_default_is_cut_by_name_into_its_depth_2_model(tmp_path) -> None:
    """`rerankd extract-depth --model rerankd-minilm-l6`: the shipped name resolves as it does
    for `serve`, the word-embedding table the package shares with its base is restored, and
    the cut scores as the default served at depth 2 (its depth-2 LoRA folded in)."""
    from safetensors import safe_open

    from rerankd.cli import main

    out = tmp_path / "d2"
    argv = ["extract-depth", "--model", DEFAULT_RERANKER, "--depth", "2", "--out", str(out)]
    assert main(argv) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        names = list(fh.keys())
    assert "bert.embeddings.word_embeddings.weight" in names
    docs = [Document(f"o{i}", t) for i, t in enumerate(OTHERS)] + [Document("rel", PASSAGE)]
    cut, full = (load_reranker(m, backend="torch") for m in (str(out), DEFAULT_RERANKER))
    try:
        alone = {r.id: r.score for r in cut.rerank(QUERY, docs).results}
        served = full.rerank(QUERY, docs, options=RerankOptions(depth=2)).results
        assert [r.id for r in served] == sorted(alone, key=alone.__getitem__, reverse=True)
        for r in served:
            assert alone[r.id] == pytest.approx(r.score, abs=1e-2), r.id
    finally:
        cut.close()
        full.close()


def test_the_default_fine_tunes_on_a_users_qrels_by_name(tmp_path) -> None:
    """`rerankd train --backbone rerankd-minilm-l6`: a user's qrels continue the shipped
    model (its head and layers, not the bundled base with a fresh head), and the folder
    written stands alone (it stores the word embeddings it was given by reference)."""
    import json

    from safetensors.torch import load_file

    from rerankd.cli import main
    from rerankd.engine.shipped import shipped_dir
    from rerankd.train.trainer import read_log
    from tests.helpers import write_toy_beir

    data = write_toy_beir(tmp_path / "toy")
    out = tmp_path / "tuned"
    argv = [
        "train", "--backbone", DEFAULT_RERANKER, "--dataset", str(data), "--out", str(out),
        "--max-steps", "1", "--lr", "1e-5", "--negatives", "3", "--depth", "8",
        "--max-length", "32", "--batch-groups", "2", "--dev-queries", "4",
        "--dev-candidates", "8", "--threads", "1", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    assert read_log(out)[0]["model"]["head"] == "from checkpoint"
    assert "external_tensors" not in json.loads((out / "rerankd.json").read_text())
    tuned = load_file(str(out / "model.safetensors"))
    shipped = load_file(str(shipped_dir(DEFAULT_RERANKER) / "model.safetensors"))
    assert "bert.embeddings.word_embeddings.weight" in tuned
    head = shipped["classifier.weight"].float()
    # one step at lr 1e-5 moves the shipped head a little; a fresh head would be elsewhere
    assert torch.allclose(tuned["classifier.weight"].float(), head, atol=1e-3)
    assert not torch.equal(tuned["classifier.weight"].float(), head)
    model = load_reranker(str(out), backend="torch")
    try:
        docs = [Document(f"o{i}", t) for i, t in enumerate(OTHERS)] + [Document("rel", PASSAGE)]
        # at the shipped model's length: this one step trained (so serves by default) at 32
        # tokens, the first window only, which cuts the passage before what makes it relevant
        wide = RerankOptions(max_length=192)
        assert model.rerank(QUERY, docs, options=wide).results[0].id == "rel"
    finally:
        model.close()


def test_the_defaults_depth_2_is_the_student_grafted_back(tmp_path) -> None:
    """`rerankd graft-depth --model rerankd-minilm-l6 --student rerankd-tiny-l2`, the
    recipe's `graft` stage on the shipped names: the full depth scores exactly as before,
    depth 2 ranks the six passages as the student does, and it scores as the shipped depth
    2, which is this graft (made before fp16 publishing rounded both models' weights). The
    deltas are what bring it that close: grafted with LoRA alone it scores farther off."""
    from scipy.stats import spearmanr

    from rerankd.cli import main

    out, lora_only = tmp_path / "grafted", tmp_path / "lora-only"
    argv = ["graft-depth", "--model", DEFAULT_RERANKER, "--student", "rerankd-tiny-l2"]
    assert main([*argv, "--out", str(out)]) == 0
    assert main([*argv, "--no-deltas", "--out", str(lora_only)]) == 0
    docs = [Document(f"o{i}", t) for i, t in enumerate(OTHERS)] + [Document("rel", PASSAGE)]
    names = (str(out), DEFAULT_RERANKER, "rerankd-tiny-l2", str(lora_only))
    grafted, shipped, student, without = (load_reranker(m, backend="torch") for m in names)
    try:

        def scores(model, **options) -> list[float]:
            resp = model.rerank(QUERY, docs, options=RerankOptions(**options))
            by_id = {r.id: r.score for r in resp.results}
            return [by_id[d.id] for d in docs]

        assert scores(grafted) == scores(shipped)  # the full depth uses no LoRA
        depth2 = scores(grafted, depth=2)
        assert depth2 == pytest.approx(scores(shipped, depth=2), abs=0.05)
        alone = scores(student)
        assert spearmanr(depth2, alone).statistic > 0.9
        assert max(depth2) == depth2[-1]  # the relevant passage first
        off = max(abs(a - b) for a, b in zip(depth2, alone, strict=True))
        off_lora_only = max(
            abs(a - b) for a, b in zip(scores(without, depth=2), alone, strict=True)
        )
        assert off < off_lora_only / 2
    finally:
        for m in (grafted, shipped, student, without):
            m.close()
