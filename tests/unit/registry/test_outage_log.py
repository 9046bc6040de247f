"""OutageLog: a background task's database failures are logged once per
outage, and the recovery once."""

from __future__ import annotations

import logging

from flywheel.protocol.errors import UnavailableError
from flywheel.registry.db import OutageLog


def test_one_warning_per_outage_and_one_line_when_it_works_again(caplog):
    log = logging.getLogger("test.outage")
    outage = OutageLog(log, "re-reading things")
    with caplog.at_level(logging.INFO, logger="test.outage"):
        outage.ok()  # nothing was wrong: nothing to say
        for _ in range(5):
            outage.failed(UnavailableError("registry database postgresql://h/db is unreachable: refused"))
        assert outage.down
        outage.ok()
        outage.ok()
        outage.failed(RuntimeError("boom"))  # a second outage is logged again
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[0] == ("WARNING", "re-reading things failed (retried quietly until it works again): "
                                   "registry database postgresql://h/db is unreachable: refused")
    assert lines[1][0] == "INFO"
    assert lines[1][1].startswith("re-reading things works again after ")
    assert lines[2] == ("WARNING", "re-reading things failed (retried quietly until it works again): RuntimeError: boom")
    assert len(lines) == 3
