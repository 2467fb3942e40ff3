"""Serve flags: every flag has an env var; flag beats env beats default; bad env is reported."""

from __future__ import annotations

import pytest

from rerankd.server.config import FLAGS, ServeConfig, model_specs, parse_serve_args


def test_every_flag_is_a_config_field_with_the_same_default() -> None:
    cfg = ServeConfig()
    for flag in FLAGS:
        assert getattr(cfg, flag.dest) == flag.default, flag.name
        assert flag.env.startswith("RERANKD_")


def test_precedence_flag_env_default() -> None:
    env = {"RERANKD_PORT": "6000", "RERANKD_MAX_DOCUMENTS": "7", "RERANKD_MODEL": "/m"}
    cfg = parse_serve_args(["--port", "7000"], env)
    assert cfg.port == 7000  # flag wins
    assert cfg.max_documents == 7  # env
    assert cfg.model == ("/m",)
    assert cfg.host == "127.0.0.1"  # default binds loopback only


def test_bad_env_value_is_an_error() -> None:
    with pytest.raises(SystemExit):
        parse_serve_args([], {"RERANKD_PORT": "not-a-number"})


def test_several_models_by_flag_or_env() -> None:
    cfg = parse_serve_args(["--model", "small=/m/a", "--model", "bundled:splade-tiny"], {})
    assert model_specs(cfg) == [("small", "/m/a"), (None, "bundled:splade-tiny")]
    cfg = parse_serve_args(["--name", "first"], {"RERANKD_MODEL": "/m/a, big=org/model"})
    assert model_specs(cfg) == [("first", "/m/a"), ("big", "org/model")]
    cfg = parse_serve_args([], {})
    assert model_specs(cfg) == [(None, "rerankd-minilm-l6")]  # the shipped default


def test_negative_max_length_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse_serve_args(["--max-length", "-1"], {})
