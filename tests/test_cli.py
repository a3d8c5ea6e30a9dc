"""The ``learned-optim`` command line (run in-process through ``learned_optim.cli.main``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from learned_optim import CoordinateLSTM, load_rule
from learned_optim.cli import RUN_LOCK_NAME, main
from learned_optim.tasks import list_tasks
from learned_optim.weights import CONFIG_NAME, PREVIOUS_RULE_MARKER, WEIGHTS_NAME, bundled_dir


def run_cli(argv: list[str]) -> int:
    """main()'s exit code, also when argparse exits through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1


@pytest.fixture
def rule_dir(tmp_path: Path) -> Path:
    """A small untrained CoordinateLSTM saved as a rule folder (seeded)."""
    folder = tmp_path / "rule"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CoordinateLSTM(hidden_size=8).save_pretrained(str(folder))
    return folder


def test_list_prints_tasks_and_rules(capsys):
    assert run_cli(["list"]) == 0
    out = capsys.readouterr().out
    assert "bundled rules:" in out
    tasks_line = next(line for line in out.splitlines() if line.startswith("tasks:"))
    assert [t.strip() for t in tasks_line.removeprefix("tasks:").split(",")] == list_tasks()
    assert "quadratic" in tasks_line and "mnist-mlp" in tasks_line


def test_version_flag_prints_the_package_version(capsys):
    import learned_optim

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"learned-optim {learned_optim.__version__}"


def test_compare_tiny_task_writes_reports(rule_dir, tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["compare", "--task", "tiny_tasks:tiny", "--rules", str(rule_dir), "--steps", "5", "--seeds", "2",
            "--baselines", "sgd,adam", "--out", str(out), "--quiet"]  # fmt: skip
    assert run_cli(argv) == 0
    stdout = capsys.readouterr().out
    assert f"| {rule_dir} |" in stdout and "| sgd |" in stdout and "| adam |" in stdout
    for suffix in ("md", "json", "png"):
        path = out / f"tiny-5.{suffix}"
        assert path.is_file() and path.stat().st_size > 0
        assert f"wrote {path}" in stdout
    report = json.loads((out / "tiny-5.json").read_text())
    assert [r["name"] for r in report["results"]] == [str(rule_dir), "sgd", "adam"]
    assert report["command"].startswith("learned-optim compare --task tiny_tasks:tiny")  # not pytest's argv
    assert (out / ".cache" / "tiny.json").is_file()


def test_compare_runs_rules_at_other_lr_multipliers(rule_dir, tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["compare", "--task", "tiny_tasks:tiny", "--rules", f"{rule_dir},{rule_dir}", "--rule-lr", "1,0.3",
            "--steps", "5", "--seeds", "2", "--baselines", "sgd", "--out", str(out), "--quiet"]  # fmt: skip
    assert run_cli(argv) == 0
    report = json.loads((out / "tiny-5.json").read_text())
    by_name = {r["name"]: r for r in report["results"]}
    assert set(by_name) == {str(rule_dir), f"{rule_dir}@0.3", "sgd"}
    assert by_name[f"{rule_dir}@0.3"]["best_lr"]["final_loss"] == 0.3
    # The same rule at another multiplier takes other steps.
    assert by_name[f"{rule_dir}@0.3"]["final_loss"] != by_name[str(rule_dir)]["final_loss"]
    capsys.readouterr()


def test_compare_seed_start_picks_fresh_seeds(rule_dir, tmp_path, capsys):
    argv = ["compare", "--task", "tiny_tasks:tiny", "--rules", str(rule_dir), "--steps", "3", "--seeds", "2",
            "--baselines", "sgd", "--quiet"]  # fmt: skip
    assert run_cli([*argv, "--seed-start", "7000", "--out", str(tmp_path / "fresh")]) == 0
    assert run_cli([*argv, "--out", str(tmp_path / "standard")]) == 0
    fresh = json.loads((tmp_path / "fresh" / "tiny-3.json").read_text())
    standard = json.loads((tmp_path / "standard" / "tiny-3.json").read_text())
    assert fresh["seeds"] == [7000, 7001] and standard["seeds"] != fresh["seeds"]
    # Other seeds, other initialisations and minibatches: other losses.
    assert standard["results"][0]["per_seed"]["final_loss"] != fresh["results"][0]["per_seed"]["final_loss"]
    capsys.readouterr()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed-start", "-1"], "--seed-start must be a non-negative integer, got -1"),
        (["--seed-start", "5", "--suite", "paper"], "--seed-start is not supported with --suite"),
    ],
)
def test_compare_bad_seed_start_exits_2(extra, message, tmp_path, capsys):
    argv = ["compare", "--task", "tiny_tasks:tiny", "--rules", "lstm-mnist", "--steps", "2", "--seeds", "1",
            "--baselines", "sgd", "--out", str(tmp_path / "r"), "--quiet", *extra]  # fmt: skip
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "rule_lr, message",
    [
        ("1,2,3", "rule_lrs has 3 values for 1 rules"),
        ("0", "rule_lrs must be positive finite numbers"),
        ("fast", "--rule-lr must be numbers separated by commas"),
    ],
)
def test_compare_bad_rule_lr_exits_2(rule_lr, message, tmp_path, capsys):
    argv = ["compare", "--task", "tiny_tasks:tiny", "--rules", "lstm-mnist", "--rule-lr", rule_lr, "--steps", "2",
            "--seeds", "1", "--baselines", "sgd", "--out", str(tmp_path / "r"), "--quiet"]  # fmt: skip
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "task, message",
    [
        ("no-such-task", "unknown task 'no-such-task'; built-in tasks: "),
        ("no_such_module:tiny", "cannot load task 'no_such_module:tiny': No module named 'no_such_module'"),
        ("tiny_tasks:no_such_attr", "cannot load task 'tiny_tasks:no_such_attr'"),
        ("tiny_tasks:tiny_model", "'tiny_tasks:tiny_model' is a Sequential, expected a learned_optim Task/TaskFamily"),
        ("tiny_tasks:TRAIN_X", "'tiny_tasks:TRAIN_X' is a Tensor"),
    ],
    ids=["unknown-name", "no-module", "no-attribute", "factory-of-a-module", "not-callable"],
)
def test_bad_task_exits_2_with_a_message(task, message, capsys, tmp_path):
    assert run_cli(["compare", "--task", task, "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing was run or written


def test_bad_task_in_a_real_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "learned_optim.cli", "meta-fit", "--task", "no-such-task", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=Path(__file__).parent, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "error: unknown task 'no-such-task'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_rule_exits_2(tmp_path, capsys):
    argv = ["compare", "--task", "tiny_tasks:tiny", "--rules", "./no-such-dir", "--out", str(tmp_path), "--quiet"]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert "no-such-dir" in err and "Traceback" not in err


META_FIT_TINY = ["meta-fit", "--task", "tiny_tasks:tiny", "--rule-config", '{"hidden_size": 4}', "--steps", "4",
                 "--unroll", "2", "--validate-every", "0", "--checkpoint-every", "2", "--quiet"]  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--log-every", "-1"], "--log-every must be >= 0"),
        (["--time-budget", "-1"], "--time-budget must be a finite number >= 0"),
        (["--time-budget", "nan"], "--time-budget must be a finite number >= 0"),
        (["--clip", "-1"], "--clip: clip_grad_norm must be >= 0 (0: no clipping), got -1.0"),
        (["--steps", "0"], "--steps: steps must be an integer >= 1, got 0"),
        (["--meta-grad-fraction", "0"], "--meta-grad-fraction: meta_grad_fraction must be in (0, 1]"),
        (["--pes-std", "0", "--estimator", "pes"], "--pes-std: pes_std must be a finite number > 0"),
        (["--rule-config", "{bad"], "--rule-config: not valid JSON"),
        (["--rule-config", "[4]"], "--rule-config: expected a JSON object"),
        (["--rule-config", '{"no_such_setting": 1}'], "--rule-config: "),
        (["--rule-config", '{"hidden_size": -1}'], "--rule-config: hidden_size must be an integer in [1, 65536]"),
        (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
        (["--loss-scale-range", "0.5"], "--loss-scale-range must be a finite number >= 1"),
        (["--loss-scale-range", "inf"], "--loss-scale-range must be a finite number >= 1"),
        (["--loss-scale-range", "10", "--meta-loss", "mean"], "the meta-loss would weigh instances by"),
        (["--train-only", "no_such"], "--train-only 'no_such': no parameter of CoordinateLSTM starts with it"),
    ],
)
def test_meta_fit_bad_flags_exit_2_naming_the_flag(flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli([*META_FIT_TINY, "--meta-iterations", "2", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert not out.exists()  # refused before any work


def _fail_meta_step(monkeypatch: pytest.MonkeyPatch, error: BaseException, at_iteration: int = 0) -> None:
    """Make meta-training raise ``error`` from the step that starts at ``at_iteration``."""
    from learned_optim.meta_fit import MetaTrainer

    real_step = MetaTrainer.step

    def step(self):
        if self.history.iteration >= at_iteration:
            raise error
        return real_step(self)

    monkeypatch.setattr(MetaTrainer, "step", step)


def test_meta_fit_ctrl_c_reports_the_checkpoint_to_resume_from(tmp_path, capsys, monkeypatch):
    _fail_meta_step(monkeypatch, KeyboardInterrupt(), at_iteration=3)
    out = tmp_path / "out"
    with torch.random.fork_rng(devices=[]):
        assert run_cli([*META_FIT_TINY, "--meta-iterations", "6", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "meta-iteration 2" in err and "--resume" in err
    assert "Traceback" not in err
    assert (out / "checkpoint" / "checkpoint.json").is_file()
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
    ],
)
def test_meta_fit_out_of_memory_says_how_to_use_less_and_where_to_resume(error, tmp_path, capsys, monkeypatch):
    _fail_meta_step(monkeypatch, error, at_iteration=3)
    out = tmp_path / "out"
    argv = [*META_FIT_TINY, "--meta-iterations", "6", "--out", str(out), "--unroll", "4", "--instances", "2"]
    with torch.random.fork_rng(devices=[]):
        assert run_cli(argv) == 1
    err = capsys.readouterr().err
    assert "out of memory at meta-iteration 3" in err and "Traceback" not in err
    assert "--grad-checkpoint-steps 2" not in err  # 4-step unrolls: nothing to gain from checkpointing
    assert "fewer --instances (now 2)" in err and "meta-iteration 2" in err and "--resume" in err
    assert (out / "checkpoint" / "checkpoint.json").is_file()
    assert not (out / "model.safetensors").exists()


def test_meta_fit_out_of_memory_suggests_checkpointing_for_long_unrolls(tmp_path, capsys, monkeypatch):
    _fail_meta_step(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    argv = [*META_FIT_TINY, "--meta-iterations", "2", "--out", str(tmp_path / "out"), "--steps", "100"]
    with torch.random.fork_rng(devices=[]):
        assert run_cli([*argv, "--unroll", "100"]) == 1
    err = capsys.readouterr().err
    assert "--grad-checkpoint-steps 10" in err and "--resume accepts it" in err
    assert "no checkpoint was written yet" in err


def test_meta_fit_other_runtime_errors_are_not_reported_as_memory(tmp_path, monkeypatch):
    _fail_meta_step(monkeypatch, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"), torch.random.fork_rng(devices=[]):
        run_cli([*META_FIT_TINY, "--meta-iterations", "2", "--out", str(tmp_path / "out")])


def test_meta_fit_overwrite_discards_the_old_checkpoint_and_keeps_the_old_rule_until_its_own(
    tmp_path, capsys, monkeypatch
):
    # The old checkpoint goes at once (a later --resume must not continue the old run), but the
    # old rule stays loadable until this run saves its own: it used to be deleted at the start,
    # so a Ctrl-C left the folder with no rule at all. A marker tells it from this run's.
    out = tmp_path / "out"
    with torch.random.fork_rng(devices=[]):
        argv = [*META_FIT_TINY, "--meta-iterations", "4", "--validate-every", "2", "--out", str(out)]
        assert run_cli(argv) == 0
    assert (out / CONFIG_NAME).exists() and (out / "checkpoint" / "best" / CONFIG_NAME).exists()
    old_weights = (out / WEIGHTS_NAME).read_bytes()
    (out / "notes.txt").write_text("mine")
    with monkeypatch.context() as patch:
        _fail_meta_step(patch, KeyboardInterrupt())
        with torch.random.fork_rng(devices=[]):
            assert run_cli([*argv, "--overwrite"]) == 130
    assert "no checkpoint was written" in capsys.readouterr().err
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    lock = f"checkpoint/{RUN_LOCK_NAME}"  # empty; the run held it while it ran
    assert left == sorted([CONFIG_NAME, PREVIOUS_RULE_MARKER, WEIGHTS_NAME, "notes.txt", lock])
    assert (out / WEIGHTS_NAME).read_bytes() == old_weights
    assert "--overwrite" in (out / PREVIOUS_RULE_MARKER).read_text()
    with pytest.warns(UserWarning, match="rule of an earlier run"):
        load_rule(str(out))
    # Without --overwrite the folder is still refused; finishing a run replaces rule and marker.
    assert run_cli(argv) == 2
    with torch.random.fork_rng(devices=[]):
        assert run_cli([*argv, "--overwrite"]) == 0
    assert not (out / PREVIOUS_RULE_MARKER).exists() and (out / "notes.txt").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "--overwrite" in json.loads((out / CONFIG_NAME).read_text())["metadata"]["command"]
        load_rule(str(out))


def test_meta_fit_cut_off_in_its_first_checkpoint_starts_afresh(tmp_path, capsys, monkeypatch):
    # Killed between the first checkpoint's weights file and its checkpoint.json, a run left a
    # folder that was refused as "not empty" with or without --resume, though all of it was its own.
    import learned_optim.meta_fit as mf

    def ctrl_c_before_checkpoint_json(*args: object) -> None:
        raise KeyboardInterrupt  # the weights file of the first checkpoint is already written

    def run(out: Path, *flags: str, cut_off: bool = False) -> int:
        with monkeypatch.context() as patch:
            if cut_off:
                patch.setattr(mf, "write_files", ctrl_c_before_checkpoint_json)
            with torch.random.fork_rng(devices=[]):
                return run_cli([*META_FIT_TINY, "--meta-iterations", "4", "--out", str(out), *flags])

    assert run(tmp_path / "fresh") == 0
    expected = (tmp_path / "fresh" / WEIGHTS_NAME).read_bytes()
    for flags in (["--resume"], []):
        out = tmp_path / f"cut{len(flags)}"
        assert run(out, cut_off=True) == 130
        assert "no checkpoint was written" in capsys.readouterr().err
        assert list((out / "checkpoint").glob("checkpoint-*.safetensors")) and not (out / CONFIG_NAME).exists()
        assert run(out, *flags) == 0, capsys.readouterr().err
        assert (out / WEIGHTS_NAME).read_bytes() == expected  # the run an empty folder gets
        assert not list((out / "checkpoint").glob(".*.tmp"))


def test_meta_fit_refuses_a_second_run_in_the_same_folder(tmp_path, capsys):
    # Both wrote checkpoint files into one folder, each deleting the other's as stale.
    from learned_optim.cli import _lock_run_folder

    out = tmp_path / "out"
    held = _lock_run_folder(out, out / "checkpoint")
    if held is None:
        pytest.skip("no advisory file locks on this platform")
    try:
        assert run_cli([*META_FIT_TINY, "--meta-iterations", "2", "--out", str(out)]) == 2
        assert "another learned-optim meta-fit is running in this folder" in capsys.readouterr().err
    finally:
        held.close()
    with torch.random.fork_rng(devices=[]):
        assert run_cli([*META_FIT_TINY, "--meta-iterations", "2", "--out", str(out)]) == 0


def test_meta_fit_overwrite_removes_the_earlier_rules_model_card(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(bundled_dir() / "lstm-quadratic", out)
    assert (out / "README.md").exists()
    with torch.random.fork_rng(devices=[]):
        assert run_cli([*META_FIT_TINY, "--meta-iterations", "2", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "README.md").exists()  # it described lstm-quadratic, not this rule


@pytest.mark.parametrize("command", ["compare", "meta-fit"])
def test_an_empty_out_is_refused(command, tmp_path, capsys, monkeypatch):
    # Path("") is the current folder: an unset "$OUT" wrote (with --overwrite, replaced) there.
    monkeypatch.chdir(tmp_path)
    argv = [*META_FIT_TINY, "--meta-iterations", "2"] if command == "meta-fit" else [
        "compare", "--task", "tiny_tasks:tiny", "--rules", "", "--steps", "2", "--seeds", "1", "--baselines", "sgd",
        "--quiet"]  # fmt: skip
    assert run_cli([*argv, "--out", ""]) == 2
    assert capsys.readouterr().err.startswith("error: --out is empty")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["compare", "meta-fit"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(command, tmp_path, capsys, monkeypatch):
    # It used to fail with a traceback when the first file was written: after the whole
    # comparison, or at meta-fit's first checkpoint.
    argv = [*META_FIT_TINY, "--meta-iterations", "2"] if command == "meta-fit" else [
        "compare", "--task", "tiny_tasks:tiny", "--rules", "", "--steps", "2", "--seeds", "1", "--baselines", "sgd",
        "--quiet"]  # fmt: skip
    (tmp_path / "afile").write_text("x")
    assert run_cli([*argv, "--out", str(tmp_path / "afile" / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {tmp_path / 'afile' / 'sub'}: cannot be created, ") and "Traceback" not in err

    def read_only(*args, **kwargs):  # a read-only folder stops nobody running as root: simulated
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("learned_optim.cli.tempfile.TemporaryFile", read_only)
    assert run_cli([*argv, "--out", str(tmp_path / "new" / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {tmp_path / 'new' / 'sub'}: not writable (cannot create it in {tmp_path})")
    assert "Permission denied" in err
    assert sorted(os.listdir(tmp_path)) == ["afile"]


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied", "x.json"), NotADirectoryError(20, "no")])
def test_files_that_turn_out_inaccessible_are_a_clean_error(error, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr("learned_optim.cli.cmd_list", fail)
    assert run_cli(["list"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {error}\n"


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", "1.5"])
def test_meta_fit_seed_out_of_range_is_a_usage_error_naming_it(seed, tmp_path, capsys):
    # 2**66 gave "Overflow when unpacking long long", not naming --seed.
    assert run_cli([*META_FIT_TINY, "--out", str(tmp_path / "out"), "--seed", seed]) == 2
    err = capsys.readouterr().err
    assert "argument --seed: " in err and "Traceback" not in err
    assert f"[0, {2**63 - 1}]" in err or "expected an integer" in err
    assert not (tmp_path / "out").exists()


def test_meta_fit_train_only_trains_the_named_parameters_and_keeps_the_rest(tmp_path, rule_dir):
    out = tmp_path / "out"
    start = CoordinateLSTM.from_pretrained(str(rule_dir))
    names = [name for name, _ in start.named_parameters()]
    prefix = names[-1].split(".")[0]  # the output layer
    argv = [*META_FIT_TINY, "--meta-iterations", "3", "--out", str(out), "--init", str(rule_dir)]
    with torch.random.fork_rng(devices=[]):
        assert run_cli([*argv, "--rule-config", json.dumps(start.config), "--train-only", prefix]) == 0
    trained = dict(CoordinateLSTM.from_pretrained(str(out)).named_parameters())
    changed = {name for name, p in start.named_parameters() if not torch.equal(p, trained[name])}
    assert changed and all(name.startswith(prefix) for name in changed)


CUSTOM_RULE_MODULE = """
import torch
from learned_optim.rules.base import UpdateRule


class SignStep(UpdateRule):
    rule_type = "_test_cli_sign_step"

    def __init__(self, scale: float = 0.01) -> None:
        super().__init__()
        self.config = {"scale": float(scale)}
        self.log_scale = torch.nn.Parameter(torch.tensor(float(scale)).log())

    def state_spec(self):
        return {}

    def forward(self, grad, state, context=None):
        return -self.log_scale.exp() * grad.sign(), state
"""


def test_custom_rule_needs_import_and_works_with_it(tmp_path, capsys, monkeypatch):
    # `compare --rules <folder of a custom rule>` failed with "unknown rule type" and no way out.
    (tmp_path / "cli_custom_rule.py").write_text(CUSTOM_RULE_MODULE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    save = "import cli_custom_rule as m; m.SignStep().save_pretrained('sign')"
    subprocess.run([sys.executable, "-c", save], check=True, cwd=tmp_path, env=env, timeout=120)
    compare = ["compare", "--task", "quadratic", "--rules", "./sign", "--steps", "5", "--seeds", "2",
               "--baselines", "sgd", "--out", "results", "--quiet"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "learned_optim.cli", *compare],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown rule type '_test_cli_sign_step'" in proc.stderr and "--import MODULE" in proc.stderr

    from learned_optim.rules import RULE_TYPES

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "cli_custom_rule", raising=False)
    try:
        assert run_cli([*compare, "--import", "cli_custom_rule"]) == 0
        assert "| ./sign |" in capsys.readouterr().out
        meta_fit = ["meta-fit", "--import", "cli_custom_rule", "--rule", "_test_cli_sign_step", "--task", "quadratic",
                    "--out", "trained", "--steps", "6", "--unroll", "3", "--meta-iterations", "2",
                    "--validate-every", "0", "--quiet"]  # fmt: skip
        assert run_cli(meta_fit) == 0
        assert "no validation (--validate-every 0): final weights" in capsys.readouterr().out
        assert json.loads((tmp_path / "trained" / CONFIG_NAME).read_text())["rule_type"] == "_test_cli_sign_step"
        assert run_cli(["compare", "--import", "no_such_module_here", "--task", "quadratic", "--quiet"]) == 2
        assert "--import no_such_module_here: No module named" in capsys.readouterr().err
    finally:
        RULE_TYPES.pop("_test_cli_sign_step", None)
        sys.modules.pop("cli_custom_rule", None)


def test_meta_fit_loss_scale_range_trains_on_scaled_instances(tmp_path, capsys, monkeypatch):
    from learned_optim.meta_fit import MetaTrainer

    seen = []
    real_new_run = MetaTrainer._new_run

    def new_run(self, *args, **kwargs):
        run = real_new_run(self, *args, **kwargs)
        seen.append(run.instance.name)
        return run

    monkeypatch.setattr(MetaTrainer, "_new_run", new_run)
    out = tmp_path / "out"
    argv = [*META_FIT_TINY, "--meta-iterations", "2", "--out", str(out), "--loss-scale-range", "100"]
    assert run_cli(argv) == 0
    factors = [float(name.rsplit("loss x", 1)[1]) for name in seen]
    assert factors and all(0.01 <= f <= 100 for f in factors) and len(set(factors)) == len(factors)
    metadata = json.loads((out / CONFIG_NAME).read_text())["metadata"]
    assert "--loss-scale-range 100" in metadata["command"]


def test_compare_suite_writes_markdown_json_and_plots(tmp_path, monkeypatch, capsys):
    import learned_optim.suites

    monkeypatch.setattr(learned_optim.suites, "classical_baselines", lambda n: {"RBF SVM": (0.25, 0.05)})
    args = [
        "compare",
        "--suite",
        "seed-xor",
        "--rules",
        "",
        "--baselines",
        "sgd",
        "--seeds",
        "2",
        "--out",
        str(tmp_path),
    ]
    assert main([*args, "--quiet"]) == 0
    written = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert "suite-seed-xor.md" in written and "suite-seed-xor.json" in written
    data = json.loads((tmp_path / "suite-seed-xor.json").read_text())
    assert data["suite"] == "seed-xor" and "--suite seed-xor" in data["command"]
    assert f"wrote {tmp_path / 'suite-seed-xor.json'}" in capsys.readouterr().out
