"""ONNX backend mechanics on tiny random checkpoints: export parity, depth, cache, races."""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from rerankd.engine.backends import onnx_backend
from rerankd.engine.backends.onnx_backend import (
    MODEL_FILE,
    OnnxBackend,
    cache_entry,
    ensure_onnx,
    publish,
)
from rerankd.engine.loading import load_cross_encoder
from rerankd.errors import InvalidInputError, ModelLoadError
from tests.helpers import write_tiny_checkpoint


def random_batch(seed: int, batch: int = 4, seq: int = 21, type_vocab: int = 2) -> dict:
    """Right-padded like `collate`: row i keeps a different number of tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 29000, size=(batch, seq), dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    for i in range(batch):
        mask[i, : max(2, seq - 5 * i)] = 1
    types = np.zeros_like(ids)
    if type_vocab > 1:
        types[:, seq // 2 :] = 1
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types * mask}


def torch_logits(folder: Path, batch: dict, depth: int | None = None) -> np.ndarray:
    model = load_cross_encoder(folder)
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in batch.items()}, depth=depth).numpy()


@pytest.fixture(scope="module")
def roberta_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-xlmr"), model_type="xlm-roberta")


@pytest.mark.parametrize("shape", [(1, 7), (4, 21), (9, 64)])
def test_fp32_graph_matches_torch_at_any_shape(
    tiny_checkpoint: Path, tmp_path: Path, shape: tuple[int, int]
) -> None:
    backend = OnnxBackend(tiny_checkpoint, precision="fp32", cache_dir=tmp_path)
    batch = random_batch(sum(shape), *shape)
    got = backend.score(batch)
    assert got.dtype == np.float32 and got.shape == (shape[0],)
    np.testing.assert_allclose(got, torch_logits(tiny_checkpoint, batch), rtol=1e-4, atol=1e-5)


def test_roberta_positions_export_correctly(roberta_checkpoint: Path, tmp_path: Path) -> None:
    # RoBERTa numbers positions from the mask (cumsum), not arange: a different subgraph.
    backend = OnnxBackend(roberta_checkpoint, precision="fp32", cache_dir=tmp_path)
    batch = random_batch(3, type_vocab=1)
    np.testing.assert_allclose(
        backend.score(batch), torch_logits(roberta_checkpoint, batch), rtol=1e-4, atol=1e-5
    )


def test_int8_scores_are_finite_and_close(tiny_checkpoint: Path, tmp_path: Path) -> None:
    backend = OnnxBackend(tiny_checkpoint, precision="int8", cache_dir=tmp_path)
    assert backend.info.precision == "int8"
    batch = random_batch(5, batch=8)
    got = backend.score(batch)
    want = torch_logits(tiny_checkpoint, batch)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.corrcoef(got, want)[0, 1] > 0.9


def test_fully_padded_row_is_finite(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # finfo.min as the additive mask must not turn a row of only padding into NaN.
    backend = OnnxBackend(tiny_checkpoint, precision="fp32", cache_dir=tmp_path)
    batch = random_batch(6)
    batch["attention_mask"][-1] = 0
    assert np.isfinite(backend.score(batch)).all()


def test_depth_runs_the_first_layers_only(tiny_checkpoint: Path, tmp_path: Path) -> None:
    backend = OnnxBackend(tiny_checkpoint, precision="fp32", cache_dir=tmp_path)
    batch = random_batch(7)
    np.testing.assert_allclose(
        backend.score(batch, depth=1), torch_logits(tiny_checkpoint, batch, depth=1), atol=1e-5
    )
    # Full depth is the graph already loaded, not a new export.
    assert backend._session(backend.num_layers) is backend._session(None)
    with pytest.raises(InvalidInputError):
        backend.score(batch, depth=backend.num_layers + 1)


def test_a_module_cast_to_bf16_is_not_exported_but_reread_in_fp32(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    model = load_cross_encoder(tiny_checkpoint).to(torch.bfloat16)
    backend = OnnxBackend(tiny_checkpoint, model, precision="fp32", cache_dir=tmp_path)
    assert next(model.parameters()).dtype == torch.bfloat16
    batch = random_batch(8)
    np.testing.assert_allclose(
        backend.score(batch), torch_logits(tiny_checkpoint, batch), rtol=1e-4, atol=1e-5
    )


def test_cache_key_follows_content_and_settings(tiny_checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_checkpoint, copy)

    def key(folder: Path, **settings: object) -> Path:
        return cache_entry(folder, cache_dir=tmp_path, **settings)[0]  # type: ignore[arg-type]

    base = key(tiny_checkpoint, precision="fp32")
    assert key(copy, precision="fp32") == base  # same bytes, same entry
    assert key(tiny_checkpoint, precision="int8") != base
    assert key(tiny_checkpoint, precision="fp32", depth=1) != base
    assert key(tiny_checkpoint, precision="int8", reduce_range=True) != key(
        tiny_checkpoint, precision="int8", reduce_range=False
    )


def test_losing_a_publish_race_keeps_the_winner(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / MODEL_FILE).write_bytes(b"winner")
    ours = tmp_path / ".entry.tmp"
    ours.mkdir()
    (ours / MODEL_FILE).write_bytes(b"loser")
    assert publish(ours, entry) is False
    assert (entry / MODEL_FILE).read_bytes() == b"winner"
    assert not ours.exists()


def test_publish_refuses_to_mask_a_broken_entry(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "stray").write_bytes(b"")
    ours = tmp_path / ".entry.tmp"
    ours.mkdir()
    (ours / MODEL_FILE).write_bytes(b"graph")
    with pytest.raises(OSError):
        publish(ours, entry)


def test_a_failed_export_leaves_no_entry(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise ModelLoadError("exporter exploded")

    monkeypatch.setattr(onnx_backend, "_export", broken)
    with pytest.raises(ModelLoadError, match="exploded"):
        OnnxBackend(tiny_checkpoint, precision="fp32", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_builds_publish_one_complete_entry(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both builders finish writing before either publishes: the tightest race there is.
    barrier = threading.Barrier(2)

    def slow_export(folder: Path, model: object, depth: object, tmp: Path) -> None:
        (tmp / MODEL_FILE).write_bytes(tmp.name.encode())
        barrier.wait(timeout=10)

    monkeypatch.setattr(onnx_backend, "_export", slow_export)
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(ensure_onnx(tiny_checkpoint, "fp32", tmp_path))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 2 and results[0] == results[1]
    entries = list(tmp_path.iterdir())
    assert entries == [results[0].parent]  # one entry, no temporary folder left behind
    assert (results[0].parent / onnx_backend.META_FILE).is_file()


def _export_in_child(folder: str, cache: str, barrier: object, out: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    path = ensure_onnx(Path(folder), "int8", Path(cache))
    out.put(str(path))  # type: ignore[attr-defined]


@pytest.mark.slow  # two fresh interpreters import torch and onnxruntime
def test_two_processes_exporting_at_once_share_one_good_entry(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    # spawn children inherit sys.path, so they import this module (and rerankd) as we do.
    procs = [
        ctx.Process(
            target=_export_in_child, args=(str(tiny_checkpoint), str(tmp_path), barrier, out)
        )
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    paths = {out.get(timeout=5), out.get(timeout=5)}
    assert len(paths) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    backend = OnnxBackend(tiny_checkpoint, precision="int8", cache_dir=tmp_path)
    assert str(backend.model_path) in paths
    assert np.isfinite(backend.score(random_batch(9))).all()


def test_quantizer_notes_stay_out_of_the_logs(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        OnnxBackend(tiny_checkpoint, precision="int8", cache_dir=tmp_path)
    noisy = [r for r in caplog.records if "quantization" in r.pathname]
    assert noisy == []
    assert any(r.name == onnx_backend.__name__ for r in caplog.records)  # ours still log


def test_settings_are_validated_and_applied(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="precision"):
        OnnxBackend(tiny_checkpoint, precision="bf16", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="threads"):
        OnnxBackend(tiny_checkpoint, threads=-1, cache_dir=tmp_path)
    backend = OnnxBackend(tiny_checkpoint, threads=1, cache_dir=tmp_path)
    options = backend._sessions[None].get_session_options()
    assert options.intra_op_num_threads == 1
    backend.close()
    with pytest.raises(ModelLoadError, match="closed"):
        backend.score(random_batch(1))


def test_int8_sessions_keep_residual_add_and_layer_norm_apart(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """`DISABLED_OPTIMIZERS` reaches ORT: left to itself ORT fuses SkipLayerNormalization into
    the int8 graph; our sessions must not (its fused kernel was the int8 graph's slow op)."""
    import onnx
    import onnxruntime as ort

    backend = OnnxBackend(tiny_checkpoint, precision="int8", cache_dir=tmp_path)
    plain = ort.SessionOptions()
    plain.optimized_model_filepath = str(tmp_path / "ort-default.onnx")
    ort.InferenceSession(str(backend.model_path), plain, providers=["CPUExecutionProvider"])
    onnx_backend.make_session(backend.model_path, 1, optimized_path=tmp_path / "ours.onnx")
    ops = {
        name: {node.op_type for node in onnx.load(str(tmp_path / name)).graph.node}
        for name in ("ort-default.onnx", "ours.onnx")
    }
    assert "SkipLayerNormalization" in ops["ort-default.onnx"]
    assert "SkipLayerNormalization" not in ops["ours.onnx"]
    assert {"LayerNormalization", "MatMulIntegerToFloat"} <= ops["ours.onnx"]


def test_query_pooled_head_exports_its_rows_dynamic(tmp_path: Path) -> None:
    """A head on the query segment's mean (`head_pooling: query`): the last layer's rows
    follow each batch's longest query segment in the exported graph, not the export's."""
    folder = write_tiny_checkpoint(tmp_path / "query", layers=2)
    (folder / "rerankd.json").write_text('{"head_pooling": "query"}')
    backend = OnnxBackend(folder, precision="fp32", cache_dir=tmp_path / "cache")
    # a constant baked in at export would be wrong for the longer or the shorter segments
    for seed, (batch, seq, split) in enumerate([(4, 21, 10), (3, 30, 3), (2, 40, 38), (5, 12, 9)]):
        data = random_batch(seed, batch, seq)
        data["token_type_ids"] = np.zeros_like(data["input_ids"])
        data["token_type_ids"][:, split:] = data["attention_mask"][:, split:]
        np.testing.assert_allclose(
            backend.score(data), torch_logits(folder, data), rtol=1e-4, atol=1e-5
        )
