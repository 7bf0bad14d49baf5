"""The systemd user unit and the launchd agent parse and agree with the daemon's exit codes."""

from __future__ import annotations

import configparser
import plistlib
from pathlib import Path

from p2pcloudd import service

DAEMON = Path(__file__).resolve().parents[2] / "daemon"


def test_systemd_unit_runs_p2pcloudd_and_does_not_restart_on_user_errors() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  (keys are case-sensitive)
    unit.read(DAEMON / "systemd" / "p2pcloudd.service")
    svc = unit["Service"]
    assert svc["ExecStart"].split()[0].endswith("/p2pcloudd")
    assert svc["KillSignal"] == "SIGTERM"
    no_restart = {int(x) for x in svc["RestartPreventExitStatus"].split()}
    assert no_restart == {service.EXIT_USER_ERROR, service.EXIT_ALREADY_RUNNING}
    assert unit["Install"]["WantedBy"] == "default.target"


def test_launchd_agent_runs_p2pcloudd_and_restarts_only_after_crashes() -> None:
    with (DAEMON / "launchd" / "net.p2pcloud.p2pcloudd.plist").open("rb") as fh:
        agent = plistlib.load(fh)
    assert agent["Label"] == "net.p2pcloud.p2pcloudd"
    assert "/.local/bin/p2pcloudd" in agent["ProgramArguments"][-1]
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["RunAtLoad"] is True


def test_docs_list_every_config_option_as_the_code_does() -> None:
    from p2pcloudd.config import options_markdown

    docs = (DAEMON.parent / "docs" / "daemon.md").read_text()
    table = docs.split("<!-- options:start -->\n", 1)[1].split("\n<!-- options:end -->", 1)[0]
    assert table == options_markdown()
