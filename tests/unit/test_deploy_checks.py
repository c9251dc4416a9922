"""The deployment tests' own checks refuse what they must: a wrong subcommand or flag, a variable
that no setting has or that the command does not read."""

from __future__ import annotations

from deploy_checks import command_of, command_problem, environment_problems


def test_a_real_command_line_passes_and_a_wrong_one_is_named() -> None:
    assert command_problem(["baton", "router", "--host", "0.0.0.0", "--port", "50051"]) is None
    assert command_problem(["baton", "probe", "127.0.0.1:50051"]) is None
    assert "invalid choice: 'routr'" in (command_problem(["baton", "routr"]) or "")
    assert "unrecognized arguments: --hots" in (command_problem(["baton", "router", "--hots", "x"]) or "")
    assert "does not run `baton`" in (command_problem(["python", "-m", "baton"]) or "")


def test_variables_must_be_settings_of_the_command() -> None:
    assert command_of(["baton", "registry", "check", "--namespace", "x"]) == "registry check"
    router = ["baton", "router"]
    assert environment_problems(router, {"BATON_REDIS_URL", "BATON_REDIS_PASSWORD", "BATON_CACHE_DIR"}) == []
    wrong = environment_problems(router, {"BATON_ROUTER"})
    assert wrong == ["router: BATON_ROUTER is not one of its settings"]
    assert environment_problems(["baton", "gateway"], {"BATON_REDIS_URL", "REDIS_PASSWORD"}) == [
        "gateway: BATON_REDIS_URL is not one of its settings",
        "gateway: REDIS_PASSWORD is not one of its settings",
    ]
