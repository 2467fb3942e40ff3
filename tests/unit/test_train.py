"""`rerankd.train` on tiny random models and a tiny synthetic BEIR folder (seconds, no data)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rerankd.engine.bundled import backbone_dir
from rerankd.engine.factory import load_reranker
from rerankd.engine.loading import load_cross_encoder
from rerankd.engine.models.bert import CrossEncoder
from rerankd.engine.models.config import ModelConfig
from rerankd.train.data import (
    BM25,
    EvaluationDataError,
    check_trainable,
    first_stage,
    load_teacher_scores,
    load_training_data,
    long_pseudo_query,
    pseudo_query,
    split_dev,
    write_teacher_scores,
)
from rerankd.train.losses import (
    distill,
    kl_distill,
    listwise_ce,
    margin_mse,
    mse_distill,
    ranknet_distill,
)
from rerankd.train.modeling import (
    default_student_layers,
    encode_batch,
    load_trainable,
    pair_encoder,
    prepare_init,
    student_from_teacher,
)
from rerankd.train.trainer import TrainConfig, TrainingError, lr_at, read_log, train
from rerankd.types import Document
from tests.helpers import write_toy_beir

# -- fixtures ------------------------------------------------------------------------------------


def _write_model(folder: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny random BERT cross-encoder with PyTorch's default init and MiniLM's tokenizer."""
    from safetensors.torch import save_file

    raw = {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "intermediate_size": hidden * 2,
        "max_position_embeddings": 128,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "num_labels": 1,
        "architectures": ["BertForSequenceClassification"],
    }
    torch.manual_seed(seed)
    model = CrossEncoder(ModelConfig.from_dict(raw))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text(json.dumps(raw))
    tok = backbone_dir("all-minilm-l6-v2") / "tokenizer.json"
    (folder / "tokenizer.json").write_bytes(tok.read_bytes())
    return folder


@pytest.fixture(scope="module")
def beir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_beir(tmp_path_factory.mktemp("beir") / "toy")


@pytest.fixture(scope="module")
def model2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_model(tmp_path_factory.mktemp("m2") / "tiny", layers=2)


@pytest.fixture(scope="module")
def model4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_model(tmp_path_factory.mktemp("m4") / "tiny4", layers=4, seed=1)


def _cfg(beir: Path, model: Path, out: Path, **kw) -> TrainConfig:
    base = {
        "dataset": beir,
        "out": out,
        "backbone": str(model),
        "epochs": 2,
        "lr": 2e-3,
        "batch_groups": 4,
        "negatives": 3,
        "depth": 8,
        "max_length": 32,
        "dev_queries": 4,
        "dev_candidates": 8,
        "warmup": 0.0,
        "progress": False,
        "threads": 1,
    }
    return TrainConfig(**(base | kw))


# -- losses --------------------------------------------------------------------------------------


def test_listwise_ce_by_hand() -> None:
    s = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    expected = (math.log(1 + 2 * math.exp(-2)) + math.log(3)) / 2
    assert listwise_ce(s).item() == pytest.approx(expected, rel=1e-6)


def test_margin_mse_by_hand_and_shift_invariant() -> None:
    s = torch.tensor([[3.0, 1.0, 0.0]])
    t = torch.tensor([[2.0, 1.0, 1.0]])
    # student margins (2, 3), teacher margins (1, 1): ((1)^2 + (2)^2) / 2
    assert margin_mse(s, t).item() == pytest.approx(2.5)
    assert margin_mse(s + 7.0, t - 3.0).item() == pytest.approx(2.5)


def test_kl_distill_by_hand() -> None:
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_distill(s, t).item() == pytest.approx(expected, rel=1e-6)
    # T = 2: teacher probabilities from log(3)/2, times T^2 = 4.
    p = math.sqrt(3) / (1 + math.sqrt(3))
    expected_t2 = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert kl_distill(s, t, temperature=2.0).item() == pytest.approx(expected_t2, rel=1e-6)
    assert kl_distill(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_ranknet_distill_by_hand_and_least_at_the_teachers_margins() -> None:
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    # pairs (0,1) and (1,0): logits +1 and -1, targets 0.5 each -> both log(1 + e^-1) + 0.5
    expected = math.log(1 + math.exp(-1.0)) + 0.5
    assert ranknet_distill(s, t).item() == pytest.approx(expected, rel=1e-6)
    assert distill("ranknet", s, t).item() == pytest.approx(expected, rel=1e-6)
    # shift-invariant on both sides; least where the student's margins are the teacher's / T
    t = torch.tensor([[2.0, 1.0, 0.5]])
    best = ranknet_distill(t / 0.5 + 3.0, t, temperature=0.5)
    for noise in (torch.tensor([[0.3, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, -0.2]])):
        assert ranknet_distill(t / 0.5 + noise, t, temperature=0.5) > best
    # a swapped pair costs more than a tie
    tie = ranknet_distill(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    swapped = ranknet_distill(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    assert swapped > tie
    with pytest.raises(ValueError, match="two documents"):
        ranknet_distill(torch.zeros(2, 1), torch.zeros(2, 1))


def test_mse_and_distill_dispatch() -> None:
    s = torch.tensor([[1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, 4.0]], requires_grad=True)
    assert mse_distill(s, t).item() == pytest.approx(2.5)
    loss = distill("mse", s, t)
    loss.backward()
    assert t.grad is None  # the teacher is a constant
    with pytest.raises(ValueError, match="unknown distillation loss"):
        distill("nope", s, t)


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    lrs = [lr_at(s, 10, 1.0, 0.2) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))
    assert lr_at(10, 10, 1.0, 0.2) == 0.0


# -- data ----------------------------------------------------------------------------------------


def test_refuses_evaluation_data(tmp_path: Path, beir: Path, model2: Path) -> None:
    with pytest.raises(EvaluationDataError, match="evaluation split"):
        check_trainable(beir, "test")
    dl = tmp_path / "trec-dl-2019"
    dl.mkdir()
    with pytest.raises(EvaluationDataError, match="evaluation-only"):
        check_trainable(dl, "train")
    out = tmp_path / "out"
    with pytest.raises(EvaluationDataError):
        train(_cfg(beir, model2, out, split="test"))
    assert not (out / "model.safetensors").exists()
    from rerankd.cli import main

    code = main(["train", "--dataset", str(beir), "--split", "test", "--out", str(out)])
    assert code == 2


def test_bm25_finds_the_matching_document() -> None:
    index = BM25({"a": "the cat eats fish", "b": "the dog eats bones", "c": "nothing here"})
    assert index.search("what does the dog eat bones", 3)[0] == "b"
    assert "c" not in index.search("dog", 3)


def test_first_stages_rank_the_matching_document_first(tmp_path: Path, beir: Path) -> None:
    data = load_training_data(beir, dev_queries=0, depth=4)
    corpus, queries = data.corpus, {"q3": data.queries["q3"]}
    assert first_stage("bm25", corpus, queries, 4)["q3"][0] == "d3"
    assert first_stage("sparse", corpus, queries, 4)["q3"][0] == "d3"  # bundled SPLADE-tiny
    assert first_stage("dense", corpus, queries, 4)["q3"][0] == "d3"  # bundled MiniLM
    run = tmp_path / "given.trec"
    run.write_text("q3 Q0 x5 1 9.0 t\nq3 Q0 nowhere 2 8.0 t\nq3 Q0 d3 3 7.0 t\n")
    assert first_stage(f"run:{run}", corpus, queries, 4) == {"q3": ["x5", "d3"]}
    with pytest.raises(ValueError, match="unknown miner"):
        first_stage("magic", corpus, queries, 4)


def test_groups_are_seeded_and_exclude_positives(beir: Path) -> None:
    data = load_training_data(beir, depth=8, dev_queries=4, dev_candidates=8, seed=3)
    assert not set(data.train_qids) & set(data.dev_qids)
    assert len(data.dev_qids) == 4 and len(data.train_qids) == 12
    g1 = data.groups_for_epoch(0, seed=3, negatives=3, depth=8)
    g2 = data.groups_for_epoch(0, seed=3, negatives=3, depth=8)
    assert g1 == g2 and len(g1) == 12
    assert g1 != data.groups_for_epoch(1, seed=3, negatives=3, depth=8)
    for g in g1:
        assert g.positive == "d" + g.qid[1:]
        assert g.positive not in g.negatives and len(set(g.negatives)) == 3
    assert split_dev(["a", "b", "c"], 1, 0) == split_dev(["a", "b", "c"], 1, 0)
    with pytest.raises(ValueError):
        split_dev(["a"], 1, 0)


def test_dev_seed_holds_apart_the_same_queries_under_another_seed(beir: Path) -> None:
    """Runs with different --seed compared on (or fused on) one dev set: --dev-seed fixes it."""
    kw = {"depth": 8, "dev_queries": 4, "dev_candidates": 8}
    base = load_training_data(beir, seed=3, **kw)
    other = load_training_data(beir, seed=5, **kw)
    pinned = load_training_data(beir, seed=5, dev_seed=3, **kw)
    assert set(other.dev_qids) != set(base.dev_qids)  # the trap: seed alone moves dev
    assert pinned.dev_qids == base.dev_qids and pinned.train_qids == base.train_qids
    assert not set(pinned.train_qids) & set(base.dev_qids)


def test_teacher_scores_round_trip(tmp_path: Path) -> None:
    scores = {"q1": {"d1": 1.5, "d2": -0.25}}
    path = write_teacher_scores(tmp_path / "t.tsv", scores)
    assert load_teacher_scores(path) == scores
    jl = tmp_path / "t.jsonl"
    jl.write_text(json.dumps({"qid": "q1", "did": "d1", "score": 2}) + "\n")
    assert load_teacher_scores(jl) == {"q1": {"d1": 2.0}}


def test_pseudo_query_is_title_else_first_sentence() -> None:
    assert pseudo_query("A title", "Body. More.") == "A title"
    assert pseudo_query("", "First sentence here. Second one.") == "First sentence here."


def test_long_pseudo_query_is_closing_sentences_from_a_sentence_start() -> None:
    text = "One two three. Four five six seven. Eight nine ten."
    assert long_pseudo_query(text, 3) == "Eight nine ten."
    assert long_pseudo_query(text, 5) == "Four five six seven. Eight"
    assert long_pseudo_query(text, 10) == text
    assert long_pseudo_query(text, 11) == ""  # shorter than asked: no query


def _long_doc_beir(root: Path) -> Path:
    """The toy BEIR folder with documents long enough (about 140 words) for long pseudo
    queries: each document's own sentence, then filler sentences naming the document."""
    write_toy_beir(root)
    docs = [json.loads(line) for line in (root / "corpus.jsonl").read_text().splitlines()]
    for d in docs:
        filler = " ".join(f"Note {k} on what {d['_id']} does in the wild." for k in range(14))
        d["text"] = f"{d['text']} {filler}"
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    return root


def test_long_pseudo_queries_come_besides_the_short_ones(tmp_path: Path) -> None:
    """Long pseudo queries are drawn with their own seed: adding them leaves the title ones
    as they were; they are 30 to 120 words and never made from a dev query's documents."""
    beir = _long_doc_beir(tmp_path / "beir")
    kw = {"query_source": "both", "pseudo_queries": 5, "dev_queries": 4, "depth": 8}
    short = load_training_data(beir, **kw)
    both = load_training_data(beir, **kw, long_pseudo_queries=6)
    long = {q for q in both.pseudo_sources if q.startswith("pseudo-long:")}
    assert len(long) == 6 and both.stats()["long_pseudo_queries"] == 6
    assert set(both.pseudo_sources) - long == set(short.pseudo_sources)
    assert short.stats()["long_pseudo_queries"] == 0
    dev_docs = {d for q in both.dev_qids for d in both.qrels[q]}
    for q in long:
        assert 30 <= len(both.queries[q].split()) <= 120
        assert both.pseudo_sources[q] not in dev_docs and q in both.train_qids
        assert both.queries[q] in " ".join(both.corpus[both.pseudo_sources[q]].split())


# -- training ------------------------------------------------------------------------------------


def test_loss_decreases_and_run_is_logged(tmp_path: Path, beir: Path, model2: Path) -> None:
    out = tmp_path / "run"
    res = train(_cfg(beir, model2, out, epochs=4))
    losses = [h["loss"] for h in res.history]
    assert res.stopped == "done" and res.epochs_done == 4 and len(losses) == 4
    assert losses[-1] < losses[0]
    events = [e["event"] for e in read_log(out)]
    assert events[0] == "start" and events[-1] == "stop" and events.count("epoch") == 4
    start = read_log(out)[0]
    assert start["config"]["seed"] == 0 and start["data"]["train_queries"] == 12
    assert "ndcg@10" in res.initial_dev["model"] and "ndcg@10" in res.history[-1]["dev"]
    # The folder is a servable checkpoint: the engine's loader and reranker take it.
    model = load_cross_encoder(out)
    assert model.config.num_layers == 2
    reranker = load_reranker(str(out), "trained", backend="torch")
    try:
        resp = reranker.rerank("what does the cat eat", [Document("a", "The cat eats grass.")])
        assert len(resp.results) == 1 and math.isfinite(resp.results[0].score)
    finally:
        reranker.close()
    # A second fresh run into the same folder is refused rather than overwriting it.
    with pytest.raises(TrainingError, match="--resume"):
        train(_cfg(beir, model2, out, epochs=4))


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path, beir: Path, model2: Path) -> None:
    whole = train(_cfg(beir, model2, tmp_path / "whole", epochs=2))
    part = train(_cfg(beir, model2, tmp_path / "cut", epochs=2, max_steps=4))
    assert part.stopped.startswith("max steps") and part.step == 4 and part.epochs_done == 1
    done = train(_cfg(beir, model2, tmp_path / "cut", epochs=2, resume=True))
    assert done.stopped == "done" and done.step == whole.step
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [h["loss"] for h in whole.history] == pytest.approx([h["loss"] for h in done.history])
    # A resume that would change the trajectory is refused, naming the field.
    with pytest.raises(TrainingError, match="lr"):
        train(_cfg(beir, model2, tmp_path / "cut", epochs=2, lr=1.0, resume=True))


def test_resume_of_a_run_saved_before_the_lora_options(
    tmp_path: Path, beir: Path, model2: Path
) -> None:
    """A field added later is compared against its default, so older runs still resume."""
    out = tmp_path / "old"
    train(_cfg(beir, model2, out, epochs=1, max_steps=1))
    state = json.loads((out / "trainer_state.json").read_text())
    state["config"] = {k: v for k, v in state["config"].items() if not k.startswith("lora_")}
    (out / "trainer_state.json").write_text(json.dumps(state))
    assert train(_cfg(beir, model2, out, epochs=1, resume=True)).stopped == "done"


def test_teacher_scores_add_a_distillation_term(tmp_path: Path, beir: Path, model2: Path) -> None:
    scores = {f"q{i}": {f"d{i}": 5.0} | {f"x{j}": 0.0 for j in range(16)} for i in range(16)}
    for i in range(16):
        scores[f"q{i}"].update({f"d{j}": -1.0 for j in range(16) if j != i})
    path = write_teacher_scores(tmp_path / "teacher.tsv", scores)
    res = train(_cfg(beir, model2, tmp_path / "kd", epochs=1, teacher_scores=path))
    assert "distill" in res.history[0]["loss_parts"] and "ce" in res.history[0]["loss_parts"]


# -- distillation --------------------------------------------------------------------------------


def test_matryoshka_stores_per_depth_heads(tmp_path: Path, beir: Path, model4: Path) -> None:
    out = tmp_path / "mat"
    res = train(_cfg(beir, model4, out, mode="matryoshka", epochs=1))
    assert "cascade" in res.history[0]["loss_parts"]
    dev = res.history[0]["dev"]
    assert set(dev["depths"]) == {"depth1", "depth2", "depth3"}
    # each cut's order against the full depth's, per dev query; the full depth has none
    assert all(-1.0 <= m["spearman_vs_full"] <= 1.0 for m in dev["depths"].values())
    assert "spearman_vs_full" not in dev
    weights = load_file(str(out / "model.safetensors"))
    for k in (1, 2, 3):
        assert weights[f"classifier_depth{k}.weight"].shape == (1, 32)
        assert weights[f"classifier_depth{k}.bias"].shape == (1,)
    assert "classifier_depth4.weight" not in weights and "classifier.weight" in weights
    meta = json.loads((out / "rerankd.json").read_text())["matryoshka"]
    assert meta["depths"] == [1, 2, 3] and meta["heads"]["2"] == "classifier_depth2"
    assert meta["pooling"] == "mean"
    # The engine serves each depth with its own head: depth k's score equals that head on
    # the pooled [CLS] of layer k, and differs from the full model's head there.
    import torch

    from rerankd.engine.factory import load_reranker
    from rerankd.engine.loading import load_cross_encoder
    from rerankd.types import Document, RerankOptions

    model = load_cross_encoder(out)
    assert model.head_depths == (1, 2, 3)
    served = load_reranker(str(out), backend="torch")
    try:
        doc = [Document("d", "a short document about cells")]
        (pair,) = served.encode("cells", doc, RerankOptions()).encoded.pairs
        ids = torch.from_numpy(pair.input_ids)[None]
        types = torch.from_numpy(pair.token_type_ids)[None]
        with torch.inference_mode():
            hidden = model.backbone(ids, torch.ones_like(ids), types, 2)
            # depth heads read the token mean (the default); the full head the pooled [CLS]
            own = model.classifier_depth2(hidden.mean(dim=1))[0, 0].item()
            generic = model.classifier(model.backbone.pooler(hidden))[0, 0].item()
        got = served.rerank("cells", doc, options=RerankOptions(depth=2)).results[0].score
        assert abs(got - own) < 1e-5 and abs(got - generic) > 1e-6
    finally:
        served.close()
    # The full-depth row of forward_depths is exactly the engine's forward.
    module = load_trainable(out).eval()
    assert module.depths == [1, 2, 3]
    ids = torch.tensor([[101, 2054, 2515, 102, 4937, 102]])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.tensor([[0, 0, 0, 0, 1, 1]]),
    }
    with torch.no_grad():
        rows = module.forward_depths(**inputs)
        assert rows.shape == (4, 1)
        torch.testing.assert_close(rows[-1], module.model(**inputs))


def test_cls_pooled_depth_heads_read_the_pooler(tmp_path: Path, beir: Path, model4: Path) -> None:
    out = tmp_path / "cls"
    train(_cfg(beir, model4, out, mode="matryoshka", epochs=1, max_steps=1, depth_pooling="cls"))
    assert json.loads((out / "rerankd.json").read_text())["matryoshka"]["pooling"] == "cls"
    model = load_cross_encoder(out)
    assert model.poolings == {}
    ids = torch.tensor([[101, 2054, 2515, 102, 4937, 102]])
    mask, types = torch.ones_like(ids), torch.tensor([[0, 0, 0, 0, 1, 1]])
    with torch.no_grad():
        hidden = model.backbone(ids, mask, types, 2)
        want = model.classifier_depth2(model.backbone.pooler(hidden))[:, 0]
        torch.testing.assert_close(model(ids, mask, types, depth=2), want)


def _depth_scores(out: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(the trained module's forward_depths rows, the engine's scores at every depth, inputs)."""
    module = load_trainable(out).eval()
    inputs = encode_batch(
        pair_encoder(out, module.config),
        module.config.pad_token_id,
        [("what does the cat eat", ["The cat eats grass.", "Many animals eat fish and seeds."])],
        32,
        with_protected=True,
    )
    plain = {k: v for k, v in inputs.items() if k != "protected"}
    engine = load_cross_encoder(out)
    with torch.no_grad():
        rows = module.forward_depths(**plain)
        served = torch.stack([engine(**plain, depth=k) for k in range(1, 5)])
    return rows, served, inputs


def test_matryoshka_lora_trains_what_the_engine_serves(
    tmp_path: Path, beir: Path, model4: Path
) -> None:
    out = tmp_path / "lora"
    res = train(_cfg(beir, model4, out, mode="matryoshka", epochs=1, max_steps=2, lora_rank=2))
    assert res.step == 2
    weights = load_file(str(out / "model.safetensors"))
    for k in (1, 2, 3):
        assert weights[f"lora_depth{k}.layer{k - 1}.attention.self.query.A"].shape == (2, 32)
        assert weights[f"lora_depth{k}.layer{k - 1}.intermediate.dense.B"].shape == (64, 2)
        assert f"lora_depth{k}.layer{k}.output.dense.A" not in weights
        assert weights[f"lora_depth{k}.layer0.output.dense.B"].abs().sum() > 0  # trained
    assert not any(k.startswith(("lora_depth4", "lora_keep")) for k in weights)
    lora = json.loads((out / "rerankd.json").read_text())["matryoshka"]["lora"]
    assert (lora["rank"], lora["alpha"], lora["vertical"], lora["horizontal"]) == (
        2,
        4.0,
        [1, 2, 3],
        False,
    )
    rows, served, _ = _depth_scores(out)
    torch.testing.assert_close(rows, served, rtol=0, atol=1e-5)
    # each depth has its own compensation: depth 2 differs from the shared (no-LoRA) pass
    engine = load_cross_encoder(out)
    inputs = {"input_ids": torch.tensor([[101, 4937, 102, 5568, 102]])}
    inputs |= {"attention_mask": torch.ones(1, 5, dtype=torch.long)}
    inputs |= {"token_type_ids": torch.tensor([[0, 0, 0, 1, 1]])}
    with torch.no_grad():
        with_lora = engine(**inputs, depth=2)
        hidden = engine.backbone(**inputs, depth=2)
        without = engine.head(hidden, 2, inputs["attention_mask"])
    assert not torch.allclose(with_lora, without, atol=1e-7)


def test_matryoshka_trains_only_the_chosen_depths(tmp_path: Path, beir: Path, model4: Path) -> None:
    """`--depths 2`: one head and one LoRA (depth 2, learning from the full depth); the run
    records the length it trained on, which serving then uses by default."""
    out = tmp_path / "d2"
    cfg = _cfg(
        beir, model4, out, mode="matryoshka", epochs=1, lora_rank=2,
        matryoshka_depths=(2,), lora_freeze_base=True,
    )  # fmt: skip
    res = train(cfg)
    assert set(res.history[-1]["dev"]["depths"]) == {"depth2"}
    weights = load_file(str(out / "model.safetensors"))
    assert "classifier_depth2.weight" in weights
    assert not any(k.startswith(("classifier_depth1", "classifier_depth3")) for k in weights)
    assert {k.split(".")[0] for k in weights if k.startswith("lora_")} == {"lora_depth2"}
    meta = json.loads((out / "rerankd.json").read_text())
    assert meta["matryoshka"]["depths"] == [2] and meta["max_length"] == 32
    assert meta["long_docs"] == "truncate"  # it read first windows: so it is served
    with pytest.raises(TrainingError, match=r"depths must be in 1\.\.3"):
        train(_cfg(beir, model4, tmp_path / "bad", mode="matryoshka", matryoshka_depths=(4,)))
    with pytest.raises(TrainingError, match="for Matryoshka"):
        _cfg(beir, model4, tmp_path / "bad2", matryoshka_depths=(2,)).validate()


def test_frozen_base_matryoshka_learns_depth_2_from_pseudo_queries(
    tmp_path: Path, beir: Path, model4: Path
) -> None:
    """With the full depth frozen and no label loss at depth 2, nothing learns from labels:
    pseudo queries add data; with a label loss anywhere they are refused."""
    kw = {"mode": "matryoshka", "epochs": 1, "lora_rank": 2, "matryoshka_depths": (2,)}
    kw |= {"query_source": "both", "pseudo_queries": 6}
    out = tmp_path / "p"
    res = train(_cfg(beir, model4, out, lora_freeze_base=True, **kw))
    assert res.history[0]["loss_parts"].keys() == {"cascade"}
    assert read_log(out)[0]["data"]["pseudo_queries"] == 6
    for bad in ({"lora_freeze_base": False}, {"lora_freeze_base": True, "depth_ce_weight": 0.5}):
        with pytest.raises(TrainingError, match="pseudo queries have no labels"):
            _cfg(beir, model4, tmp_path / "bad", **kw, **bad).validate()


def test_fresh_lora_changes_no_score(model4: Path) -> None:
    module = load_trainable(model4, depths=[1, 2, 3]).eval()
    ids = torch.tensor([[101, 2054, 2515, 102, 4937, 102]])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.tensor([[0, 0, 0, 0, 1, 1]]),
    }
    with torch.no_grad():
        before = module.forward_depths(**inputs)
        module.add_lora(2, 4.0, ["attention.self.query", "output.dense"], True, seed=0)
        after = module.forward_depths(**inputs)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    a = dict(module.named_parameters())["model.lora_depth2.layer1.output.dense.A"]
    assert a.abs().max() > 0 and a.abs().max() <= 1 / math.sqrt(a.shape[1])


def test_matryoshka_horizontal_lora_trains_the_pruned_configuration(
    tmp_path: Path, beir: Path, model4: Path
) -> None:
    out = tmp_path / "keep"
    res = train(
        _cfg(
            beir,
            model4,
            out,
            mode="matryoshka",
            epochs=1,
            lora_rank=2,
            lora_horizontal=0.5,
        )
    )
    assert "horizontal" in res.history[0]["loss_parts"]
    assert "ndcg@10" in res.history[0]["dev"]["pruned"]
    weights = load_file(str(out / "model.safetensors"))
    assert weights["lora_keep.layer3.output.dense.B"].abs().sum() > 0
    assert json.loads((out / "rerankd.json").read_text())["matryoshka"]["lora"]["horizontal"]
    rows, served, inputs = _depth_scores(out)
    torch.testing.assert_close(rows, served, rtol=0, atol=1e-5)
    module = load_trainable(out).eval()
    engine = load_cross_encoder(out)
    keep = (1.0, 0.5, 0.5, 0.5)
    with torch.no_grad():
        trained = module.model.forward_pruned(**inputs, keep=keep)
        torch.testing.assert_close(engine.forward_pruned(**inputs, keep=keep), trained)
        plain = {k: v for k, v in inputs.items() if k != "protected"}
        torch.testing.assert_close(engine(**plain), module(**plain))


def test_lora_freeze_base_keeps_the_base_weights_and_resumes(
    tmp_path: Path, beir: Path, model4: Path
) -> None:
    kw = {"mode": "matryoshka", "epochs": 1, "lora_rank": 2, "lora_freeze_base": True}
    kw |= {"lora_horizontal": 0.5}
    whole = train(_cfg(beir, model4, tmp_path / "whole", **kw))
    before = load_file(str(model4 / "model.safetensors"))
    after = load_file(str(tmp_path / "whole" / "model.safetensors"))
    for name, t in before.items():
        assert torch.equal(after[name], t), name
    assert all(after[n].abs().sum() > 0 for n in after if n.endswith(".B"))  # LoRA trained
    # resume mid-epoch ends where the uninterrupted run did
    part = train(_cfg(beir, model4, tmp_path / "cut", max_steps=1, **kw))
    assert part.step == 1
    done = train(_cfg(beir, model4, tmp_path / "cut", resume=True, **kw))
    assert done.step == whole.step
    cut = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert cut.keys() == after.keys()
    for name in after:
        torch.testing.assert_close(cut[name], after[name], rtol=0, atol=1e-6, msg=name)


def test_horizontal_lora_added_to_a_finished_model_trains_only_itself(
    tmp_path: Path, beir: Path, model4: Path
) -> None:
    """`--lora-horizontal` on a model with vertical LoRA: only the new `lora_keep` adapters
    train, so every tensor the model had (base, heads, vertical LoRA) and every unpruned
    score is unchanged, while the pruned scores move; a resumed run ends where an
    uninterrupted one does."""
    d2 = {"mode": "matryoshka", "matryoshka_depths": (2,), "lora_rank": 2, "epochs": 1}
    mat = tmp_path / "mat"
    train(_cfg(beir, model4, mat, lora_freeze_base=True, max_steps=2, **d2))
    ext = {"lora_horizontal": 0.5, "lora_freeze_base": True, **d2}
    res = train(_cfg(beir, mat, tmp_path / "ext", **ext))
    assert "horizontal" in res.history[0]["loss_parts"]
    assert read_log(tmp_path / "ext")[0]["model"]["trains"] == "horizontal LoRA only"
    before = load_file(str(mat / "model.safetensors"))
    after = load_file(str(tmp_path / "ext" / "model.safetensors"))
    for name, t in before.items():
        assert torch.equal(after[name], t), name
    added = set(after) - set(before)
    assert added and all(n.startswith("lora_keep.") for n in added)
    assert all(after[n].abs().sum() > 0 for n in added if n.endswith(".B"))  # trained
    lora = json.loads((tmp_path / "ext" / "rerankd.json").read_text())["matryoshka"]["lora"]
    assert lora["vertical"] == [2] and lora["horizontal"]
    old, new = load_cross_encoder(mat), load_cross_encoder(tmp_path / "ext")
    _, _, inputs = _depth_scores(tmp_path / "ext")
    plain = {k: v for k, v in inputs.items() if k != "protected"}
    keep = (1.0, 0.5, 0.5, 0.5)
    with torch.no_grad():
        for depth in (2, None):
            torch.testing.assert_close(new(**plain, depth=depth), old(**plain, depth=depth))
        pruned_old = old.forward_pruned(**inputs, keep=keep)
        assert not torch.allclose(new.forward_pruned(**inputs, keep=keep), pruned_old)
    part = train(_cfg(beir, mat, tmp_path / "cut", max_steps=1, **ext))
    assert part.step == 1
    assert train(_cfg(beir, mat, tmp_path / "cut", resume=True, **ext)).step == res.step
    cut = load_file(str(tmp_path / "cut" / "model.safetensors"))
    for name in after:
        torch.testing.assert_close(cut[name], after[name], rtol=0, atol=1e-6, msg=name)
    # what would change the finished model is refused, saying what to pass
    for bad, match in (
        ({"lora_freeze_base": False}, "pass --lora-freeze-base"),
        ({"matryoshka_depths": (1, 2)}, r"has heads for depths \[2\]"),
        ({"depth_pooling": "cls"}, "pass --depth-pooling mean"),
        ({"lora_rank": 4}, "one LoRA scale"),
    ):
        with pytest.raises(TrainingError, match=match):
            train(_cfg(beir, mat, tmp_path / "bad", **(ext | bad)))
    with pytest.raises(TrainingError, match="has LoRA compensation already"):
        train(_cfg(beir, tmp_path / "ext", tmp_path / "bad", **ext))


def test_lora_options_are_validated(tmp_path: Path, beir: Path, model4: Path) -> None:
    with pytest.raises(TrainingError, match="for Matryoshka"):
        train(_cfg(beir, model4, tmp_path / "a", lora_rank=2))
    with pytest.raises(TrainingError, match="needs --lora-rank"):
        train(_cfg(beir, model4, tmp_path / "b", mode="matryoshka", lora_horizontal=0.5))
    with pytest.raises(TrainingError, match="lora_targets"):
        train(_cfg(beir, model4, tmp_path / "c", mode="matryoshka", lora_rank=2, lora_targets=()))
    # a model with LoRA already is not given a second set
    first = tmp_path / "first"
    train(_cfg(beir, model4, first, mode="matryoshka", epochs=1, max_steps=1, lora_rank=2))
    with pytest.raises(TrainingError, match="has LoRA compensation already"):
        train(_cfg(beir, first, tmp_path / "d", mode="matryoshka", lora_rank=2))


def test_cli_dev_seed_reaches_the_run(tmp_path: Path, beir: Path, model2: Path) -> None:
    from rerankd.cli import main

    out = tmp_path / "cli"
    argv = [
        "train", "--backbone", str(model2), "--dataset", str(beir), "--negatives", "3",
        "--depth", "8", "--max-length", "32", "--dev-queries", "4", "--dev-candidates", "8",
        "--batch-groups", "4", "--threads", "1", "--no-progress", "--max-steps", "1",
        "--seed", "5", "--dev-seed", "3", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    config = read_log(out)[0]["config"]
    assert config["seed"] == 5 and config["dev_seed"] == 3


def test_cli_lora_flags(tmp_path: Path, beir: Path, model4: Path) -> None:
    from rerankd.cli import main

    out = tmp_path / "cli"
    tiny = [
        "--dataset", str(beir), "--negatives", "3", "--depth", "8", "--max-length", "32",
        "--dev-queries", "4", "--dev-candidates", "8", "--batch-groups", "4", "--threads", "1",
        "--no-progress", "--max-steps", "1", "--out", str(out),
    ]  # fmt: skip
    lora = ["--lora-rank", "2", "--lora-targets", "output.dense,attention.self.query"]
    lora += ["--lora-horizontal", "0.5", "--lora-freeze-base"]
    assert main(["distill", "--matryoshka", "--model", str(model4), *lora, *tiny]) == 0
    meta = json.loads((out / "rerankd.json").read_text())["matryoshka"]["lora"]
    assert meta["targets"] == ["attention.self.query", "output.dense"] and meta["alpha"] == 4.0
    assert meta["horizontal"] and read_log(out)[0]["config"]["lora_freeze_base"]
    with pytest.raises(SystemExit):
        main(["distill", "--teacher", str(model4), "--lora-rank", "2", *tiny])
    with pytest.raises(SystemExit):
        main(["distill", "--matryoshka", "--model", str(model4), "--lora-targets", "x", *tiny])


def test_cli_query_source_reaches_both_distill_modes(
    tmp_path: Path, beir: Path, model4: Path
) -> None:
    """`--queries`/`--pseudo-queries` reach a --matryoshka run as well as a student's (the
    Matryoshka branch once dropped them); long pseudo queries without pseudo ones are refused."""
    from rerankd.cli import main

    tiny = [
        "--dataset", str(beir), "--negatives", "3", "--depth", "8", "--max-length", "32",
        "--dev-queries", "4", "--dev-candidates", "8", "--batch-groups", "4", "--threads", "1",
        "--no-progress", "--max-steps", "1", "--queries", "both", "--pseudo-queries", "3",
    ]  # fmt: skip
    frozen = ["--depths", "2", "--lora-rank", "2", "--lora-freeze-base", "--depth-ce-weight", "0"]
    out = tmp_path / "mat"
    assert (
        main(["distill", "--matryoshka", "--model", str(model4), *frozen, *tiny, "--out", str(out)])
        == 0
    )
    run = read_log(out)[0]
    assert run["config"]["query_source"] == "both" and run["data"]["pseudo_queries"] == 3
    student = ["distill", "--teacher", str(model4), "--ce-weight", "0", *tiny]
    assert main([*student, "--out", str(tmp_path / "st")]) == 0
    assert read_log(tmp_path / "st")[0]["data"]["pseudo_queries"] == 3
    with pytest.raises(SystemExit):
        main([*student, "--queries", "train", "--long-pseudo-queries", "2", "--out", str(out)])


def test_student_can_start_from_an_extracted_depth(
    tmp_path: Path, beir: Path, model4: Path
) -> None:
    """--student-init: the teacher's depth 2 as a model of its own (mean-pooled head) trained
    further against the teacher; the head's pooling survives, the weights move."""
    from rerankd.cli import main

    mat = tmp_path / "mat"
    train(_cfg(beir, model4, mat, mode="matryoshka", epochs=1, matryoshka_depths=(2,)))
    init = tmp_path / "d2"
    assert main(["extract-depth", "--model", str(mat), "--depth", "2", "--out", str(init)]) == 0
    assert main(["extract-depth", "--model", str(mat), "--depth", "3", "--out", str(init)]) == 2
    out = tmp_path / "st"
    kw = {"mode": "student", "teacher": str(mat), "ce_weight": 0.0, "distill_loss": "margin-mse"}
    train(_cfg(beir, mat, out, epochs=1, student_init=str(init), **kw))
    log = read_log(out)
    assert log[0]["model"]["init"] == str(init)
    assert log[0]["model"]["head_pooling"] == "mean"  # inherited from the init, and logged
    # the dev log says how closely the student's order tracks the teacher's
    devs = [e["dev"] for e in log if "dev" in e]
    assert -1.0 <= devs[0]["model"]["spearman_vs_teacher"] <= 1.0
    assert "spearman_vs_teacher" not in devs[0]["teacher"]
    assert -1.0 <= devs[-1]["spearman_vs_teacher"] <= 1.0
    same = train(_cfg(beir, mat, tmp_path / "same", max_steps=1, student_init=str(mat), **kw))
    assert same.initial_dev["model"]["spearman_vs_teacher"] == pytest.approx(1.0)
    student = load_cross_encoder(out)
    assert student.config.num_layers == 2 and 2 in student.poolings
    before = load_file(str(init / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    with pytest.raises(TrainingError, match="for student distillation"):
        _cfg(beir, mat, out, mode="matryoshka", student_init=str(init)).validate()
    other = tmp_path / "other"  # a student whose vocabulary differs from the teacher's
    shutil.copytree(init, other)
    for name in ("tokenizer.json", "vocab.txt"):
        if (other / name).exists():
            (other / name).write_text((other / name).read_text().replace("cat", "kat"))
    with pytest.raises(TrainingError, match="share the teacher's tokenizer"):
        train(_cfg(beir, mat, tmp_path / "o", epochs=1, student_init=str(other), **kw))
    argv = ["distill", "--teacher", str(mat), "--student-init", str(init), "--student-layers", "2"]
    with pytest.raises(SystemExit):
        main([*argv, "--dataset", str(beir), "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("pooling", ["cls", "query"])
def test_student_pooling_switches_the_head(
    tmp_path: Path, beir: Path, model4: Path, pooling: str
) -> None:
    """`--student-pooling cls|query` on a token-mean init: the head (its weights carried
    over) reads [CLS] or the query segment's mean; the folder says so, the engine serves it
    that way, and resuming keeps it."""
    from rerankd.cli import main

    mat = tmp_path / "mat"
    train(_cfg(beir, model4, mat, mode="matryoshka", epochs=1, max_steps=1, matryoshka_depths=(2,)))
    init = tmp_path / "d2"
    assert main(["extract-depth", "--model", str(mat), "--depth", "2", "--out", str(init)]) == 0
    assert load_cross_encoder(init).pooling(None) == "mean"
    kw = {"mode": "student", "teacher": str(mat), "ce_weight": 0.0, "student_init": str(init)}
    out = tmp_path / "st"
    train(_cfg(beir, mat, out, epochs=1, max_steps=1, student_pooling=pooling, **kw))
    meta = json.loads((out / "rerankd.json").read_text())
    assert meta.get("head_pooling", "cls") == pooling
    assert read_log(out)[0]["model"]["head_pooling"] == pooling
    served = load_cross_encoder(out)
    assert served.pooling(None) == pooling
    module = load_trainable(out).eval()
    ids = torch.tensor([[101, 2054, 2515, 102, 4937, 2003, 102]])
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    x |= {"token_type_ids": torch.tensor([[0, 0, 0, 0, 1, 1, 1]])}
    with torch.no_grad():
        torch.testing.assert_close(served(**x), module(**x))
        # the same weights read the token mean under the init's pooling: another score
        module.set_head_pooling("mean")
        assert not torch.allclose(module(**x), served(**x))
    done = train(_cfg(beir, mat, out, epochs=1, resume=True, student_pooling=pooling, **kw))
    assert done.step > 1 and load_cross_encoder(out).pooling(None) == pooling
    with pytest.raises(TrainingError, match="student_pooling is for student distillation"):
        _cfg(beir, mat, out, mode="matryoshka", student_pooling=pooling).validate()
    with pytest.raises(TrainingError, match="one of"):
        _cfg(beir, mat, out, student_pooling="max", **kw).validate()


def test_student_can_start_from_a_bare_encoder_of_another_width(
    tmp_path: Path, beir: Path, model4: Path
) -> None:
    """--student-init with a bare encoder (no head; here narrower than the teacher, and its
    tokenizer saved with other padding settings): it gets a head drawn from the seed and
    learns the teacher's scores."""
    from safetensors.torch import save_file

    bare = _write_model(tmp_path / "bare", layers=2, hidden=16, seed=3)
    weights = load_file(str(bare / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")},
              str(bare / "model.safetensors"))  # fmt: skip
    spec = json.loads((bare / "tokenizer.json").read_text())
    spec["padding"] = None
    spec["truncation"] = {"direction": "Right", "max_length": 512, "strategy": "LongestFirst",
                          "stride": 0}  # fmt: skip
    (bare / "tokenizer.json").write_text(json.dumps(spec))
    kw = {"mode": "student", "teacher": str(model4), "ce_weight": 0.0, "distill_loss": "ranknet"}
    out = tmp_path / "st"
    train(_cfg(beir, model4, out, max_steps=2, student_init=str(bare), seed=5, **kw))
    model = read_log(out)[0]["model"]
    assert model["init"] == str(bare) and model["head"] == "untrained, seed 5"
    student = load_cross_encoder(out)
    assert student.config.hidden_size == 16 and student.config.num_layers == 2
    seeded, _ = prepare_init(str(bare), tmp_path / "ref", seed=5)  # the head it started from
    before = load_file(str(seeded / "model.safetensors"))["classifier.weight"]
    assert not torch.equal(before, load_file(str(out / "model.safetensors"))["classifier.weight"])


def test_student_starts_from_the_chosen_teacher_layers(tmp_path: Path, model4: Path) -> None:
    assert default_student_layers(6, 2) == [0, 5]
    assert default_student_layers(12, 4) == [0, 4, 7, 11]
    student = student_from_teacher(model4, [0, 3], tmp_path / "student")
    t = load_file(str(model4 / "model.safetensors"))
    s = load_file(str(student / "model.safetensors"))
    for name, value in s.items():
        src = name
        if name.startswith("bert.encoder.layer.1."):
            src = name.replace("layer.1.", "layer.3.", 1)
        torch.testing.assert_close(value, t[src], rtol=0, atol=0, msg=name)
    assert not any(k.startswith("bert.encoder.layer.2.") for k in s)
    assert load_cross_encoder(student).config.num_layers == 2


def test_student_distillation_run(tmp_path: Path, beir: Path, model4: Path) -> None:
    out = tmp_path / "st"
    res = train(
        _cfg(
            beir,
            model4,
            out,
            mode="student",
            teacher=str(model4),
            ce_weight=0.0,
            distill_loss="mse",
            epochs=1,
            query_source="both",
            pseudo_queries=6,
        )
    )
    assert res.history[0]["loss_parts"].keys() == {"distill"}
    assert "teacher" in res.initial_dev
    log = read_log(out)[0]
    assert log["model"]["teacher_layers"] == [0, 3] and log["data"]["pseudo_queries"] == 6
    assert load_cross_encoder(out).config.num_layers == 2


def test_bf16_autocast_trains(tmp_path: Path, beir: Path, model2: Path) -> None:
    res = train(_cfg(beir, model2, tmp_path / "bf16", epochs=1, bf16=True))
    assert math.isfinite(res.history[0]["loss"])
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["classifier.weight"].dtype == (
        torch.float32
    )


def test_cli_train_and_distill(tmp_path: Path, beir: Path, model4: Path, capsys) -> None:
    from rerankd.cli import main

    tiny = [
        "--dataset", str(beir), "--negatives", "3", "--depth", "8", "--max-length", "32",
        "--dev-queries", "4", "--dev-candidates", "8", "--batch-groups", "4", "--threads", "1",
        "--no-progress", "--lr", "1e-3",
    ]  # fmt: skip
    assert main(["train", "--backbone", str(model4), "--out", str(tmp_path / "t"), *tiny]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["stopped"] == "done" and summary["epochs_done"] == 1
    out = tmp_path / "m"
    assert (
        main(["distill", "--matryoshka", "--model", str(tmp_path / "t"), "--out", str(out), *tiny])
        == 0
    )
    assert "classifier_depth3.weight" in load_file(str(out / "model.safetensors"))
    student = tmp_path / "s"
    args = [
        "distill",
        "--teacher",
        str(tmp_path / "t"),
        "--layer-map",
        "1,2",
        "--out",
        str(student),
    ]
    assert main([*args, *tiny]) == 0
    assert read_log(student)[0]["model"]["teacher_layers"] == [1, 2]
    # A teacher must be a trained cross-encoder; a bare encoder is refused.
    assert (
        main(["distill", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), *tiny])
        == 2
    )
