"""Saving and loading rules: config.json + model.safetensors, validation, name resolution."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import learned_optim
from learned_optim import CoordinateLSTM, HierarchicalRNN, LearnedOptimizer, UpdateRule
from learned_optim import weights as weights_module
from learned_optim.weights import (
    CONFIG_NAME,
    DEFAULT_RULE,
    WEIGHTS_NAME,
    PretrainedError,
    list_pretrained,
    load_from_directory,
    load_rule,
    resolve_rule,
    save_pretrained,
)


@pytest.fixture
def rule():
    torch.manual_seed(0)
    return CoordinateLSTM(hidden_size=6, num_layers=2, output_scale=0.2)


@pytest.fixture
def saved(tmp_path, rule):
    directory = tmp_path / "rule"
    save_pretrained(rule, directory)
    return directory


def _edit_config(directory, edit):
    path = directory / CONFIG_NAME
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _param():
    return [torch.nn.Parameter(torch.randn(3))]


# ---------------------------------------------------------------------------- save


def test_save_writes_exactly_config_and_safetensors(saved, rule):
    assert sorted(os.listdir(saved)) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((saved / CONFIG_NAME).read_text())
    assert config["format"] == "learned_optim.rule"
    assert config["format_version"] == 1
    assert config["rule_type"] == "CoordinateLSTM"
    assert config["config"] == rule.config
    raw = (saved / WEIGHTS_NAME).read_bytes()
    assert not raw.startswith(b"\x80")  # not a pickle
    assert not raw.startswith(b"PK")  # not a torch.save zip archive
    with safe_open(str(saved / WEIGHTS_NAME), framework="pt") as f:
        assert set(f.keys()) == set(rule.state_dict())


def test_save_with_model_card_and_metadata(tmp_path, rule):
    save_pretrained(rule, tmp_path / "r", model_card="# my rule\n", metadata={"task": "quadratic"})
    assert sorted(os.listdir(tmp_path / "r")) == sorted([CONFIG_NAME, "README.md", WEIGHTS_NAME])
    assert (tmp_path / "r" / "README.md").read_text() == "# my rule\n"
    assert json.loads((tmp_path / "r" / CONFIG_NAME).read_text())["metadata"] == {"task": "quadratic"}
    rule.save_pretrained(str(tmp_path / "m"))  # the method form
    assert sorted(os.listdir(tmp_path / "m")) == [CONFIG_NAME, WEIGHTS_NAME]


def test_saved_files_follow_the_umask(tmp_path, rule):
    # Rules are shared and shipped: the files must not come out owner-only (mkstemp's 0600).
    old = os.umask(0o022)
    try:
        save_pretrained(rule, tmp_path / "r", model_card="card")
    finally:
        os.umask(old)
    for name in (CONFIG_NAME, WEIGHTS_NAME, "README.md"):
        assert stat.S_IMODE(os.stat(tmp_path / "r" / name).st_mode) == 0o644, name


def test_save_overwrites_and_rejects_non_rules(saved, rule):
    with torch.no_grad():
        rule.output.bias.fill_(0.5)
    save_pretrained(rule, saved)
    assert sorted(os.listdir(saved)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary files left
    assert float(load_from_directory(saved).output.bias.detach()) == 0.5
    with pytest.raises(TypeError, match="UpdateRule"):
        save_pretrained(torch.nn.Linear(2, 2), saved)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_save_refuses_non_finite_weights_and_keeps_the_folder(saved, rule, value):
    # Such a file would be refused on load: the folder keeps the good rule it held.
    good = load_from_directory(saved).state_dict()
    with torch.no_grad():
        rule.output.bias.fill_(value)
    with pytest.raises(ValueError, match=r"weights \['output.bias'\] hold non-finite values"):
        save_pretrained(rule, saved)
    assert sorted(os.listdir(saved)) == [CONFIG_NAME, WEIGHTS_NAME]
    reloaded = load_from_directory(saved).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in good.items())


def test_a_save_cut_off_between_its_two_renames_does_not_load_as_a_mixed_rule(tmp_path, monkeypatch):
    # Weights are renamed into place first: cut off there, the folder holds the new weights
    # beside the old config. Loading must refuse that pair, not mix them (an output_scale
    # changes no tensor shape, so nothing else would notice).
    first = CoordinateLSTM(hidden_size=4, output_scale=0.1)
    save_pretrained(first, tmp_path, metadata={"who": "first"})
    second = CoordinateLSTM(hidden_size=4, output_scale=0.5)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(weights_module.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(second, tmp_path, metadata={"who": "second"})
    monkeypatch.undo()
    assert Path(calls[0]).name == WEIGHTS_NAME
    with pytest.raises(PretrainedError, match=r"not the weights .*config.json was saved with"):
        load_from_directory(tmp_path)
    save_pretrained(second, tmp_path)  # a completed save repairs it
    assert load_from_directory(tmp_path).config["output_scale"] == 0.5


def test_weights_of_another_save_are_named_as_such_before_their_shapes(saved, tmp_path):
    # A larger rule's weights copied over: the hash says what happened, not a shape mismatch.
    save_pretrained(CoordinateLSTM(hidden_size=9), tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / WEIGHTS_NAME, saved / WEIGHTS_NAME)
    with pytest.raises(PretrainedError, match=r"not the weights .*config.json was saved with"):
        load_from_directory(saved)


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("hidden_size", 5, r"does not describe this rule's weights.*biases\.0"),
        ("preprocess", "yes", "would not load back"),
    ],
)
def test_a_config_edited_after_the_rule_was_built_is_not_saved(rule, tmp_path, key, value, text):
    rule.config[key] = value
    with pytest.raises(ValueError, match=text):
        save_pretrained(rule, tmp_path / "edited")
    assert not (tmp_path / "edited").exists()


def test_a_config_without_the_weights_hash_still_loads(saved, rule):
    # Files written before the hash was recorded, or by hand.
    _edit_config(saved, lambda config: config.pop("weights_sha256"))
    loaded = load_from_directory(saved)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in rule.state_dict().items())
    _edit_config(saved, lambda config: config.update(weights_sha256="abc"))
    with pytest.raises(PretrainedError, match="'weights_sha256' must be a SHA-256 hex digest"):
        load_from_directory(saved)


# ---------------------------------------------------------------------------- load


def test_load_round_trip(saved, rule):
    loaded = load_from_directory(saved)
    assert type(loaded) is CoordinateLSTM
    assert loaded.config == rule.config
    expected = rule.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype
        assert torch.equal(got[key], value), key
    for loaded_rule in (
        load_rule(str(saved)),
        UpdateRule.from_pretrained(str(saved)),
        CoordinateLSTM.from_pretrained(str(saved)),
    ):
        assert all(torch.equal(loaded_rule.state_dict()[k], v) for k, v in expected.items())
    g = torch.randn(4)
    with torch.no_grad():
        assert torch.equal(rule(g, rule.init_state(4))[0], loaded(g, loaded.init_state(4))[0])


def test_from_pretrained_checks_the_class(saved):
    class _Other(UpdateRule):
        pass

    with pytest.raises(TypeError, match="CoordinateLSTM"):
        _Other.from_pretrained(str(saved))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.update(rule_type="NoSuchRule"), "unknown rule type 'NoSuchRule'"),
        (lambda c: c.update(rule_type=["CoordinateLSTM"]), "rule_type"),
        (lambda c: c.pop("rule_type"), "missing key 'rule_type'"),
        (lambda c: c["config"].pop("hidden_size"), r"missing config keys \['hidden_size'\]"),
        (lambda c: c["config"].update(dropout=0.1), r"unexpected config keys \['dropout'\]"),
        (lambda c: c.update(config=[1, 2]), "'config' must be a JSON object"),
        (lambda c: c.update(format="something-else"), "format"),
        (lambda c: c.update(format_version=99), "format_version 99"),
        (lambda c: c["config"].update(hidden_size=0), "invalid config"),
        (lambda c: c["config"].update(preprocess_p=0.0), "invalid config"),
        # Strict values: a "false" string is not False, a NaN scale would corrupt every step.
        (lambda c: c["config"].update(preprocess="false"), "preprocess must be true or false, got 'false'"),
        (lambda c: c["config"].update(output_scale=float("nan")), "output_scale must be a finite number"),
        (lambda c: c["config"].update(hidden_size=20.9), r"hidden_size must be an integer in \[1, 65536\], got 20.9"),
        (lambda c: c.update(format_version=0), "format_version must be a positive integer, got 0"),
        (lambda c: c.update(format_version=True), "format_version must be a positive integer, got True"),
        (lambda c: c.update(format_version="1"), "format_version must be a positive integer, got '1'"),
    ],
)
def test_bad_config_names_the_file(saved, edit, match):
    _edit_config(saved, edit)
    with pytest.raises(PretrainedError, match=match) as info:
        load_from_directory(saved)
    assert str(saved / CONFIG_NAME) in str(info.value)


def test_tensor_shape_disagreeing_with_config(saved):
    _edit_config(saved, lambda c: c["config"].update(hidden_size=8))
    with pytest.raises(PretrainedError, match="shape") as info:
        load_from_directory(saved)
    assert str(saved / WEIGHTS_NAME) in str(info.value)


def _hierarchical(**changes):
    return lambda c: c.update(rule_type="HierarchicalRNN", config={**HierarchicalRNN().config, **changes})


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        # Within the bounds on sizes, and still ~60 GB if allocated
        (lambda c: c["config"].update(hidden_size=60000), r"'biases\.0' has shape \(24,\), the config implies"),
        (_hierarchical(param_hidden=60000), "tensors do not match the config"),
    ],
)
def test_huge_config_is_refused_from_the_file_header_without_allocating(saved, edit, match):
    # A tiny config.json (e.g. downloaded) must not make loading allocate the network it
    # describes before the weights are compared: that was an out-of-memory RuntimeError (or
    # minutes and tens of GB for hidden_size=20000), now a PretrainedError about the tensors.
    _edit_config(saved, edit)
    with pytest.raises(PretrainedError, match=match) as info:
        load_from_directory(saved)
    assert str(saved / WEIGHTS_NAME) in str(info.value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c["config"].update(num_layers=10**12), r"num_layers must be an integer in \[1, 64\], got 10+"),
        (_hierarchical(timescales=10**12), r"timescales must be an integer in \[1, 64\]"),
        (_hierarchical(tensor_hidden=10**6), r"tensor_hidden must be an integer in \[1, 65536\]"),
    ],
)
def test_sizes_past_the_rules_bounds_are_refused_before_building(saved, edit, match):
    # Before the bounds, num_layers=10**12 looped in the constructor for minutes (9.5 GB),
    # timescales=10**12 allocated until memory ran out; the file's header was never reached.
    _edit_config(saved, edit)
    with pytest.raises(PretrainedError, match=match):
        load_from_directory(saved)


def test_a_header_missing_many_tensors_lists_a_few(saved, rule):
    _edit_config(saved, lambda c: c["config"].update(num_layers=60))
    with pytest.raises(PretrainedError, match=r"missing \[.*\] and \d+ more\)") as info:
        load_from_directory(saved)
    assert len(str(info.value)) < 1000


def test_a_config_too_large_to_count_is_a_pretrained_error(saved):
    # Even the size-only (meta device) build overflows: the error must still be about the file.
    _edit_config(saved, lambda c: c["config"].update(hidden_size=10**9))
    with pytest.raises(PretrainedError, match=r"config.json: invalid config for CoordinateLSTM"):
        load_from_directory(saved)


def test_missing_or_extra_tensors(saved, rule):
    tensors = {k: v.clone() for k, v in rule.state_dict().items()}
    tensors.pop("output.bias")
    save_file(tensors, str(saved / WEIGHTS_NAME))
    with pytest.raises(PretrainedError, match=r"missing.*output\.bias") as info:
        load_from_directory(saved)
    assert str(saved / WEIGHTS_NAME) in str(info.value)
    tensors = {k: v.clone() for k, v in rule.state_dict().items()}
    tensors["extra"] = torch.zeros(2)
    save_file(tensors, str(saved / WEIGHTS_NAME))
    with pytest.raises(PretrainedError, match=r"unexpected.*extra"):
        load_from_directory(saved)


def test_non_finite_or_integer_tensors(saved, rule):
    tensors = {k: v.clone() for k, v in rule.state_dict().items()}
    tensors["output.bias"] = torch.tensor([float("nan")])
    save_file(tensors, str(saved / WEIGHTS_NAME))
    with pytest.raises(PretrainedError, match="non-finite"):
        load_from_directory(saved)
    tensors["output.bias"] = torch.tensor([1], dtype=torch.int64)
    save_file(tensors, str(saved / WEIGHTS_NAME))
    with pytest.raises(PretrainedError, match="dtype"):
        load_from_directory(saved)


def test_values_beyond_float32_and_unsupported_dtypes_are_refused(saved, rule):
    tensors = {k: v.double() for k, v in rule.state_dict().items()}
    tensors["output.bias"] = torch.tensor([1e300], dtype=torch.float64)  # inf in the rule's float32
    save_file(tensors, str(saved / WEIGHTS_NAME))
    with pytest.raises(PretrainedError, match=r"'output\.bias' holds non-finite values"):
        load_from_directory(saved)
    tensors = {k: v.to(torch.float8_e4m3fn) for k, v in rule.state_dict().items()}
    save_file(tensors, str(saved / WEIGHTS_NAME))
    with pytest.raises(PretrainedError, match=r"dtype torch\.float8_e4m3fn, expected one of"):
        load_from_directory(saved)


def test_a_failed_save_changes_nothing(saved, rule):
    before = {name: (saved / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    with pytest.raises(ValueError, match="plain JSON values"):
        save_pretrained(CoordinateLSTM(hidden_size=3), saved, metadata={"when": object()})
    assert {name: (saved / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(saved)) == sorted(before)  # no temporary files left behind
    assert load_from_directory(saved).config == rule.config


def test_save_expands_the_home_folder(tmp_path, rule, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    save_pretrained(rule, "~/my-rule")
    assert (tmp_path / "my-rule" / WEIGHTS_NAME).is_file()
    assert load_rule("~/my-rule").config == rule.config


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0, 8 / 10_000])
def test_truncated_safetensors(saved, keep):
    path = saved / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(PretrainedError, match="not a valid safetensors file") as info:
        load_from_directory(saved)
    assert str(path) in str(info.value)


def test_corrupt_safetensors(saved):
    path = saved / WEIGHTS_NAME
    path.write_bytes(b"\x80\x04\x95 definitely a pickle, not tensors" * 4)
    with pytest.raises(PretrainedError, match="not a valid safetensors file") as info:
        load_from_directory(saved)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME])
def test_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(PretrainedError, match="file not found") as info:
        load_from_directory(saved)
    assert str(saved / name) in str(info.value)


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b'"a string"', b"\xff\xfe\x00garbage"])
def test_invalid_json(saved, content):
    path = saved / CONFIG_NAME
    path.write_bytes(content)
    with pytest.raises(PretrainedError, match="JSON") as info:
        load_from_directory(saved)
    assert str(path) in str(info.value)


def test_config_that_is_a_directory(saved):
    (saved / CONFIG_NAME).unlink()
    (saved / CONFIG_NAME).mkdir()
    with pytest.raises(PretrainedError) as info:
        load_from_directory(saved)
    assert str(saved / CONFIG_NAME) in str(info.value)


def test_not_a_directory(tmp_path):
    with pytest.raises(PretrainedError, match="not a directory"):
        load_from_directory(tmp_path / "nope")


# ---------------------------------------------------------------------------- name resolution


def test_local_directory_for_the_optimizer(saved, rule, monkeypatch):
    monkeypatch.chdir(saved.parent)
    opt = LearnedOptimizer(_param(), pretrained="./rule")
    assert type(opt.rule) is CoordinateLSTM
    assert all(torch.equal(opt.rule.state_dict()[k], v) for k, v in rule.state_dict().items())
    assert opt.rule is not rule
    opt2 = LearnedOptimizer(_param(), pretrained=saved)  # a Path works too
    assert opt2.rule.config == rule.config


@pytest.mark.parametrize("name", ["./does-not-exist", "/no/such/dir/anywhere", "~/no-such-rule-dir-xyz", "a/b/c"])
def test_bad_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PretrainedError, match="no such directory") as info:
        LearnedOptimizer(_param(), pretrained=name)
    assert name in str(info.value)


def test_unknown_plain_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PretrainedError, match="not a bundled rule"):
        resolve_rule("no-such-bundled-rule")


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_name_is_not_the_current_folder(saved, monkeypatch, name):
    # Path("") is "." : an unset setting (os.environ.get("RULE", "")) must not load whatever
    # rule happens to sit in the working directory.
    monkeypatch.chdir(saved)
    with pytest.raises(PretrainedError, match="empty"):
        resolve_rule(name)


def test_a_rule_file_instead_of_its_folder_names_the_folder(saved):
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        with pytest.raises(PretrainedError, match=f"is a file, not a rule folder.*{re.escape(str(saved))}"):
            resolve_rule(str(saved / name))


def test_revision_with_a_rule_object_is_an_error(rule):
    with pytest.raises(PretrainedError, match="revision='v1' applies only"):
        LearnedOptimizer(_param(), pretrained=rule, revision="v1")


def test_existing_file_is_not_a_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "somefile").write_text("x")
    with pytest.raises(PretrainedError, match="is a file, not a rule folder"):
        resolve_rule("somefile")


def test_a_path_object_is_never_a_hub_repo_id(tmp_path, monkeypatch):
    # Path("acme/rule") names a local folder: a missing one is an error here, not a download
    # of the Hub repo "acme/rule" (which would run, or fetch someone else's rule).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("learned_optim.hub.download_rule", _no_download)
    for pretrained in (Path("acme/rule"), Path("acme") / "rule"):
        with pytest.raises(PretrainedError, match="no such directory") as info:
            resolve_rule(pretrained)
        assert "acme/rule" in str(info.value)


def _no_download(*args, **kwargs):
    raise AssertionError(f"tried the Hub: {args} {kwargs}")


def test_revision_with_a_name_that_resolves_locally_is_an_error(tmp_path, rule, monkeypatch):
    # A local folder "acme/rule" shadows the Hub repo of that name; with revision= the user
    # asked for the Hub's branch, so loading the local folder silently would be wrong.
    monkeypatch.chdir(tmp_path)
    save_pretrained(rule, tmp_path / "acme" / "rule")
    monkeypatch.setattr("learned_optim.hub.download_rule", _no_download)
    assert load_rule("acme/rule").config == rule.config
    with pytest.raises(PretrainedError, match=r"'acme/rule' is the local directory .*revision='v2' applies only"):
        load_rule("acme/rule", revision="v2")
    with pytest.raises(PretrainedError, match="revision='v2' applies only"):
        LearnedOptimizer(_param(), pretrained=str(tmp_path / "acme" / "rule"), revision="v2")
    bundle = tmp_path / "bundle"
    save_pretrained(rule, bundle / "tiny-lstm")
    monkeypatch.setattr(weights_module, "bundled_dir", lambda: bundle)
    with pytest.raises(PretrainedError, match="'tiny-lstm' is a bundled rule, but revision='main'"):
        load_rule("tiny-lstm", revision="main")


def test_list_pretrained_of_the_package():
    names = list_pretrained()
    assert names == sorted(names)
    for name in names:
        assert isinstance(load_rule(name), UpdateRule)


def test_bundled_lookup(tmp_path, rule, monkeypatch):
    bundle = tmp_path / "bundle"
    save_pretrained(rule, bundle / "tiny-lstm")
    save_pretrained(rule, bundle / DEFAULT_RULE)
    (bundle / "not-a-rule").mkdir()  # directories without config.json are not listed
    monkeypatch.setattr(weights_module, "bundled_dir", lambda: bundle)
    assert learned_optim.list_pretrained() == sorted(["tiny-lstm", DEFAULT_RULE])
    monkeypatch.chdir(tmp_path)  # a bundled name wins over nothing local; no cwd lookups needed
    loaded = load_rule("tiny-lstm")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in rule.state_dict().items())
    opt = LearnedOptimizer(_param(), pretrained="tiny-lstm")
    assert opt.rule.config == rule.config
    default = LearnedOptimizer(_param())  # the default name resolves once it is bundled
    assert default.rule.config == rule.config


def test_missing_default_lists_bundled_names(tmp_path, rule, monkeypatch):
    bundle = tmp_path / "bundle"
    save_pretrained(rule, bundle / "only-this-one")
    monkeypatch.setattr(weights_module, "bundled_dir", lambda: bundle)
    with pytest.raises(PretrainedError, match="only-this-one") as info:
        LearnedOptimizer(_param())
    assert DEFAULT_RULE in str(info.value)


def test_save_refuses_a_rule_that_would_not_load_back_as_itself(tmp_path):
    class _Tweaked(CoordinateLSTM):  # inherits rule_type, changes the math: not registered
        def forward(self, grad, state, context=None):
            update, new_state = super().forward(grad, state, context)
            return 2 * update, new_state

    # It used to be saved as "CoordinateLSTM" and load back as the plain LSTM, silently.
    with pytest.raises(ValueError, match=r"would load back as .*CoordinateLSTM.*own rule_type"):
        save_pretrained(_Tweaked(), tmp_path / "tweaked")

    class _Nameless(UpdateRule):
        def state_spec(self):
            return {}

    with pytest.raises(ValueError, match="has no rule_type"):
        _Nameless().save_pretrained(tmp_path / "nameless")

    class _ForgotConfig(UpdateRule):
        rule_type = "_test_weights_forgot_config"

        def __init__(self, step: float = 0.1, beta: float = 0.9) -> None:
            super().__init__()
            self.config = {"step": step, "gamma": beta}  # "beta" missing, "gamma" not an argument

        def state_spec(self):
            return {}

    try:
        # Saving used to succeed; loading then failed with "missing config keys".
        with pytest.raises(ValueError, match=r"missing \['beta'\].*unexpected \['gamma'\]"):
            _ForgotConfig().save_pretrained(tmp_path / "forgot")
    finally:
        from learned_optim.rules import RULE_TYPES

        RULE_TYPES.pop("_test_weights_forgot_config", None)
    assert not any((tmp_path / d).exists() for d in ("tweaked", "nameless", "forgot"))


def test_a_local_folder_named_like_a_bundled_rule_warns_that_the_bundled_one_loads(tmp_path, monkeypatch):
    import warnings

    monkeypatch.chdir(tmp_path)
    mine = CoordinateLSTM(hidden_size=4)
    mine.save_pretrained("lstm-mnist")
    param = torch.nn.Parameter(torch.ones(2))
    with pytest.warns(UserWarning, match=r"loads the bundled rule, not the folder 'lstm-mnist'") as caught:
        opt = LearnedOptimizer([param], pretrained="lstm-mnist")
    assert caught[0].filename == __file__  # points at the user's line
    assert opt.rule.config["hidden_size"] == 20  # the bundled rule, as documented
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LearnedOptimizer([param], pretrained="./lstm-mnist").rule.config["hidden_size"] == 4


def test_save_refuses_integer_and_bool_buffers_rather_than_round_them(tmp_path):
    # An int64 buffer holding 2**40 + 1 was cast to float32 and loaded back as 2**40, silently.
    class _Counting(UpdateRule):
        rule_type = "_test_weights_counting"

        def __init__(self, scale: float = 0.01) -> None:
            super().__init__()
            self.config = {"scale": scale}
            self.w = torch.nn.Parameter(torch.tensor([scale]))
            self.register_buffer("table", torch.tensor([2**40 + 1, 3]))
            self.register_buffer("flag", torch.tensor([True, False]))

        def state_spec(self):
            return {}

    try:
        with pytest.raises(ValueError, match=r"entries \['table \(torch.int64\)', 'flag \(torch.bool\)'\] are not"):
            _Counting().save_pretrained(tmp_path / "counting")
    finally:
        from learned_optim.rules import RULE_TYPES

        RULE_TYPES.pop("_test_weights_counting", None)
    assert not (tmp_path / "counting").exists()


@pytest.mark.parametrize("name", ["", "  "])
def test_save_refuses_an_empty_string_instead_of_writing_the_working_directory(tmp_path, rule, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"my": "project settings"}')
    with pytest.raises(ValueError, match="save_directory is an empty string"):
        save_pretrained(rule, name)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME]
    save_pretrained(rule, Path(""))  # an explicit Path is a folder, as when loading
    assert load_rule(".").config == rule.config


def test_save_argument_types_and_a_file_in_the_way_are_named(tmp_path, rule):
    with pytest.raises(TypeError, match=r"model_card must be a str .*got bytes"):
        save_pretrained(rule, tmp_path / "card", model_card=b"# card")
    with pytest.raises(TypeError, match="metadata must be a dict, got list"):
        save_pretrained(rule, tmp_path / "meta", metadata=[1, 2])
    assert sorted(os.listdir(tmp_path)) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match=r"'.*afile' exists and is not a folder"):
        save_pretrained(rule, tmp_path / "afile")


@pytest.mark.parametrize(
    ("text", "match"),
    [("[" * 100_000 + "]" * 100_000, "nested too deeply"), ('{"x": ' + "9" * 5000 + "}", "cannot be read as JSON")],
    ids=["deep", "long-int"],
)
def test_configs_python_cannot_parse_are_pretrained_errors(saved, text, match):
    # A RecursionError and a bare ValueError (no file name) escaped PretrainedError.
    (saved / CONFIG_NAME).write_text(text)
    with pytest.raises(PretrainedError, match=match) as info:
        load_from_directory(saved)
    assert str(saved / CONFIG_NAME) in str(info.value)


def test_a_folder_an_overwrite_run_has_not_replaced_yet_loads_with_a_warning(saved, rule):
    from learned_optim.weights import PREVIOUS_RULE_MARKER

    (saved / PREVIOUS_RULE_MARKER).write_text("earlier run")
    with pytest.warns(UserWarning, match="rule of an earlier run") as caught:
        loaded = load_rule(str(saved))
    assert caught[0].filename == __file__
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in rule.state_dict().items())


def test_a_failed_hub_lookup_says_that_no_local_folder_has_that_name(tmp_path, monkeypatch):
    # "runs/typo" is a repo id only because no such folder exists: the error must say so.
    monkeypatch.chdir(tmp_path)

    def offline(repo_id, **kwargs):
        raise PretrainedError(f"Hub repository {repo_id!r}: config.json is not in the local cache")

    monkeypatch.setattr("learned_optim.hub.download_rule", offline)
    with pytest.raises(PretrainedError, match=r"not in the local cache") as info:
        load_rule("runs/typo")
    assert f"no local folder of that name in {tmp_path}" in str(info.value)
