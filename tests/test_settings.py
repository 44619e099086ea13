"""engine/settings.py: the command line prints the defaults a run will use, and filling them before parsing changes nothing."""

import re
import tomllib
from pathlib import Path

import pytest
import tyro

from engine import checks, settings

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"  # parsing never resolves it


def help_text(argv, monkeypatch, capsys) -> str:
    monkeypatch.setenv("COLUMNS", "80")  # one column of flags
    with pytest.raises(SystemExit) as stopped:
        settings.parse([*argv, "--help"])
    assert stopped.value.code == 0
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out).split())  # the text, unwrapped


def default_of(text: str, flag: str) -> str:
    return re.search(rf"{re.escape(flag)} \S+ .*?\(default: ([^)]*)\)", text).group(1)


@pytest.mark.parametrize("argv, expected", [
    ([], {"--learning-rate": "0.001", "--beta": "0.0", "--max-new-tokens": "16", "--iterations": "30",
          "--r-max": "1.0", "--eval.episodes": "128", "--spa.learning-rate": "0.001", "--max-turns": "10"}),
    (["--model", HUB_ID], {"--learning-rate": "1e-06", "--beta": "0.01", "--max-new-tokens": "512",
                           "--iterations": "150", "--spa.learning-rate": "0.0001"}),
    (["--env", "alfworld", "--model", HUB_ID], {"--max-turns": "50", "--history": "2", "--r-max": "10.0",
                                                "--eval.episodes": "140", "--tau-d": "0.2", "--workers": "2"}),
    (["--env", "alfworld"], {"--iterations": "4", "--groups": "4", "--max-turns": "20", "--eval.episodes": "16"}),
    (["--method", "spa"], {"--actions-per-turn": "2", "--max-new-tokens": "256"}),
])
def test_help_prints_the_value_each_setting_takes_for_the_method_env_and_model_given(argv, expected, monkeypatch,
                                                                                      capsys):
    text = help_text(argv, monkeypatch, capsys)
    assert {flag: default_of(text, flag) for flag in expected} == expected
    assert "(default: None)" not in text and "{None}" not in text
    # those that follow another setting say which
    assert default_of(text, "--eval.max-turns") == "--max-turns"
    assert default_of(text, "--filter.sft-epochs") == "--wm-epochs"


@pytest.mark.parametrize("argv", [
    [], ["--model", HUB_ID], ["--env", "alfworld", "--method", "rwml-grpo"], ["--model", HUB_ID, "--beta", "0.5"],
    ["--method", "spa", "--max-new-tokens", "64", "--spa.epochs", "1", "--spa.no-format-filter"],
    ["--max-turns", "20", "--wm-epochs", "3", "--eval.every", "4", "--seed", "2", "--max-length", "7"],
])
def test_filling_the_recipe_before_parsing_gives_the_run_it_gave_after(argv):
    parsed = settings.parse(argv)
    assert settings.settle(parsed) == settings.settle(tyro.cli(settings.Args, args=argv))


def test_a_setting_that_follows_another_follows_the_command_line():
    args = settings.settle(settings.parse(["--max-turns", "20", "--wm-epochs", "3", "--eval.every", "4", "--seed", "2"]))
    assert (args.eval.max_turns, args.filter.sft_epochs, args.eval.wm_every, args.out) == (
        20, 3, 4, "runs/paw-frozenlake-seed2")
    assert args.loss.max_length is None  # each stage's own budget (train.step_config)


def test_override_sets_settings_by_their_dotted_names_and_refuses_unknown_ones():
    args = settings.override(settings.Args(), {"iterations": 2, "eval.episodes": 4, "loss.beta": 0.1})
    assert (args.iterations, args.eval.episodes, args.loss.beta, args.eval.samples) == (2, 4, 0.1, 1)
    assert isinstance(args.eval, settings.Eval)
    filled = settings.override(args, {"iterations": 5, "groups": 3}, unset_only=True)
    assert (filled.iterations, filled.groups) == (2, 3)
    with pytest.raises(TypeError):
        settings.override(args, {"eval.epsiodes": 4})


def test_every_setting_a_recipe_fills_starts_unset():
    """settle() fills only the settings still None, so a recipe's value for a setting with a default of its own would
    never take effect, and nothing would say so (the tau2 default's group size and RWML data sizes once did not)."""
    for recipe in (settings.EMBEDDED, settings.PAPER, settings.EMBEDDED_ALFWORLD, settings.EMBEDDED_TAU2):
        assert [name for name in recipe if settings.get(settings.Args(), name) is not None] == []


def test_every_flag_name_is_one_the_command_line_takes():
    args = settings.settle(settings.Args(model=HUB_ID))
    argv = []
    for flag, value in settings.flags(args).items():
        if value is not None:
            argv += settings.argument(flag, value)
    assert tyro.cli(settings.Args, args=argv) == args


@pytest.mark.parametrize("argv, fix", [
    (["--learning-rate", "-1"], "--learning-rate 0.001"),  # the embedded default's recipe
    (["--model", HUB_ID, "--learning-rate", "-1"], "--learning-rate 1e-06"),  # the papers'
    (["--iterations", "0"], "--iterations 30"),
    (["--model", HUB_ID, "--iterations", "0"], "--iterations 150"),
    (["--env", "alfworld", "--max-turns", "0"], "--max-turns 20"),  # the embedded default's on ALFWorld
    (["--max-length", "0"], "--max-length 512"),  # unset in every recipe: the rule's own example
])
def test_a_number_out_of_range_is_answered_with_the_value_of_the_runs_own_recipe(argv, fix):
    """The value --help prints for the run's --method, --env and --model: what it would have used, not what another
    recipe uses."""
    problems = checks.number_problems(settings.settle(settings.parse(argv)))
    [problem] = [problem for problem in problems if problem.startswith(f"{argv[-2]} must be")]
    assert problem.endswith(f"Fix: pass e.g. {fix}.")


def test_every_top_level_module_is_installed():
    """pyproject's py-modules: a module left out imports from a checkout but not from an installed copy."""
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]
    assert sorted(listed) == sorted(p.stem for p in ROOT.glob("*.py"))


def test_rwml_takes_the_authors_kl_coefficient_with_a_model_and_the_policys_with_the_embedded_default():
    """The RWML authors' scripts: kl_loss_coef 0.001 (low_var_kl, k3) in run_alfworld_state_prediction.sh, 0.01 in
    run_alfworld_policy_rl.sh. The embedded default's RWML keeps --beta, as it did before --wm-beta existed."""
    import train

    paper = settings.settle(settings.Args(method="rwml-grpo", model=HUB_ID))
    assert (paper.wm_beta, paper.loss.beta, paper.loss.kl_estimator) == (0.001, 0.01, "k3")
    assert train.STAGE_TABLE["rwml"].step_config(paper).loss.beta == 0.001
    assert train.STAGE_TABLE["grpo"].step_config(paper).loss.beta == 0.01
    assert settings.settle(settings.override(settings.Args(method="rwml"), {"loss.beta": 0.05})).wm_beta == 0.05
    assert settings.settle(settings.Args(method="rwml")).wm_beta == 0.0
