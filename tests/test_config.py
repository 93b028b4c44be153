"""TOML configs, dotted overrides, type checks, unknown keys with suggestions, shipped configs."""

from pathlib import Path

import pytest

from tokenratio.config import Config, ConfigError, load_config

REQUIRED = ["model.name_or_path=m", "data.path=d"]


def test_overrides_parse_toml_values_and_bare_strings():
    cfg = load_config(
        None,
        [
            *REQUIRED,
            "train.lr=1e-6",
            "loss.options.kl_estimator=k3",
            "model.name_or_path=HuggingFaceTB/SmolLM2-135M",
            "train.max_steps=7",
            'model.lora_target_modules=["q_proj", "v_proj"]',
        ],
    )
    assert cfg.train.lr == 1e-6 and cfg.train.max_steps == 7
    assert cfg.loss.options == {"kl_estimator": "k3"}
    assert cfg.model.name_or_path == "HuggingFaceTB/SmolLM2-135M"
    assert cfg.model.lora_target_modules == ("q_proj", "v_proj")
    assert load_config(None, [*REQUIRED, "train.lr=1"]).train.lr == 1.0  # int -> float


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1e-6", r"unknown key 'train.lrr' \(did you mean 'lr'\?\)"),
        ("trian.lr=1e-6", r"unknown key 'trian' \(did you mean 'train'\?\)"),
        ("train.learnig_rate=1e-6", r"unknown key 'train.learnig_rate' \(did you mean 'lr'\?\)"),
        ("train.gradient_accumulation_steps=2", r"\(did you mean 'grad_accumulation'\?\)"),
        ("train.cpu=True", r"train.cpu: expected bool \(true or false\), got 'True'"),
        ("train.batch_size=2.5", r"train.batch_size: expected int, got 2.5"),
        ("train.optimizer=sgd", r"choose one of \['rmsprop', 'adamw'\]"),
        ("train.lr", r"must look like section.key=value"),
        ("train.head_tile_elements=0", r"train.head_tile_elements = 0: must be >= 1"),
        ("loss.beta=-0.1", r"loss.beta = -0.1: must be > 0"),
        ("loss.beta=0", r"loss.beta = 0.0: must be > 0"),
        ("train.max_steps=-1", r"train.max_steps = -1: must be >= 1"),
        ("train.keep_checkpoints=0", r"train.keep_checkpoints = 0: must be >= 1"),
        ("train.batch_size=0", r"train.batch_size = 0: must be >= 1"),
        ("train.grad_accumulation=0", r"train.grad_accumulation = 0: must be >= 1"),
        ("train.log_every=0", r"train.log_every = 0: must be >= 1"),
        ("data.max_prompt_length=0", r"data.max_prompt_length = 0: must be >= 1"),
        ("train.warmup_ratio=nan", r"train.warmup_ratio = nan: must be a finite number"),
        ("train.warmup_ratio=1.5", r"train.warmup_ratio = 1.5: must be >= 0 and <= 1"),
        ("data.heldout_fraction=0", r"data.heldout_fraction = 0.0: must be > 0 and <= 1"),
        ("train.lr=inf", r"train.lr = inf: must be a finite number"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*REQUIRED, override])


def test_required_values_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.name_or_path is required"):
        load_config(None, ["data.path=d"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_config_is_frozen():
    cfg = load_config(None, REQUIRED)
    with pytest.raises(AttributeError):
        cfg.train.lr = 1.0
    assert isinstance(cfg, Config)


CONFIGS = sorted(Path(__file__).parents[1].glob("configs/*.toml"))


def _tables(path: Path) -> set[str]:
    import tomllib

    return set(tomllib.loads(path.read_text()))


STUDIES = [p for p in CONFIGS if "study" in _tables(p)]
FRONTIERS = [p for p in CONFIGS if "frontier" in _tables(p)]


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.name.startswith("study")])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.loss.name in ("tbpo-a", "tbpo-q")
    if (
        "paper" in path.name
    ):  # docs/method.md §4: RMSprop 5e-7, beta 0.1, LoRA r=32 alpha=64, clip 10
        assert (cfg.train.optimizer, cfg.train.lr, cfg.loss.beta) == ("rmsprop", 5e-7, 0.1)
        assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.train.max_grad_norm) == (32, 64, 10.0)
        assert cfg.train.warmup_ratio == 0.05 and cfg.data.max_length == 2048


def test_tisdpo_weight_defaults_match_the_weight_function():
    """The benchmark calls importance_weights with its defaults; `tokenratio tisdpo` with the config's."""
    import inspect

    from tokenratio.config import TisdpoConfig
    from tokenratio.tisdpo import importance_weights

    defaults = inspect.signature(importance_weights).parameters
    for name in ("lower", "upper", "scale"):
        assert defaults[name].default == getattr(TisdpoConfig(), name)


@pytest.mark.parametrize("path", STUDIES)
def test_shipped_study_configs_load_and_name_real_methods(path):
    from tokenratio.methods import parse_method
    from tokenratio.study.config import load_study

    study, base = load_study(path)
    for method in study.methods:
        parse_method(method)  # a loss of the registry with valid options
    assert {"dpo", "tdpo1", "tbpo-q", "tbpo-a"} <= {parse_method(m)[0] for m in study.methods}
    if "gpu" in path.name:  # every loss of the registry, and TDPO1 with the Bregman generator
        assert "tdpo1[generator=sba]" in study.methods
    assert len(study.seeds) >= 2 and base.data.path.endswith("harmless-base-test.jsonl.gz")


@pytest.mark.parametrize("path", FRONTIERS)
def test_shipped_frontier_configs_load_and_span_betas(path):
    from tokenratio.frontier.config import load_frontier
    from tokenratio.methods import parse_method

    frontier, base = load_frontier(path)
    assert {"dpo", "tdpo1", "tbpo-q", "tbpo-a"} <= {parse_method(m)[0] for m in frontier.methods}
    assert len(frontier.betas) >= 4 and frontier.checkpoints >= 3
    if "gpu" in path.name:  # a gold reward model the user names, and the study's other losses
        assert frontier.gold.startswith("reward-model:") and "ipo" in frontier.methods
    else:
        assert frontier.gold == "vader" and base.train.trunk_cache


def test_shipped_configs_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("smollm2_hh_cpu", "smollm2_hh_cpu.toml", "configs/smollm2_hh_cpu.toml"):
        assert load_config(name).model.name_or_path == "models/smollm2-135m"
    with pytest.raises(ConfigError, match=r"does not exist \(shipped with tokenratio: .*smollm2"):
        load_config("configs/nope.toml")


def test_the_wheel_ships_the_configs(tmp_path):
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(root)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    names = zipfile.ZipFile(next(tmp_path.glob("tokenratio-*.whl"))).namelist()
    shipped = {n.removeprefix("tokenratio/configs/") for n in names if "/configs/" in n}
    in_repo = {str(p.relative_to(root / "configs")) for p in (root / "configs").rglob("*.*")}
    assert shipped == in_repo and "smollm2_hh_cpu.toml" in shipped


def test_print_config_is_a_commented_config_that_loads_back_equal(tmp_path, capsys):
    from tokenratio.cli import main

    args = ["train", "configs/smollm2_hh_cpu.toml", "--print-config", "--set", "train.lr=1e-4"]
    assert main([*args, "--set", "loss.options.kl_estimator=k3"]) == 0
    printed = capsys.readouterr().out
    assert "lr = 0.0001  # paper: RMSprop 5e-7" in printed
    assert "# gguf_file =  (unset)" in printed
    (tmp_path / "printed.toml").write_text(printed)
    expected = load_config(
        "configs/smollm2_hh_cpu.toml", ["train.lr=1e-4", "loss.options.kl_estimator=k3"]
    )
    assert load_config(tmp_path / "printed.toml") == expected


def test_a_huge_value_is_cut_in_the_error():
    with pytest.raises(ConfigError) as err:
        load_config(None, [*REQUIRED, f"train.optimizer={'x' * 10_000_000}"])
    assert len(str(err.value)) < 300 and "..." in str(err.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"a" + b".b" * 30_000 + b" = 1\n", r"line 1: a key of over 64 parts"),
        (b"x = " + b"[" * 40 + b"]" * 40 + b"\n", r"line 1: tables or arrays nested over 32 deep"),
        (b'[model]\nname_or_path = "m\xff"\n', r"line 2: not UTF-8 \(byte 25\)"),
        (b"# " + b"x" * (1 << 20) + b"\n", r"a config is at most 1 MB"),
    ],
)
def test_hostile_configs_are_refused_before_parsing(content, message, tmp_path):
    """Python's TOML parser is quadratic in a dotted key's parts (a 60 KB key: 28 s and 5 GB)."""
    path = tmp_path / "hostile.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path, REQUIRED)
