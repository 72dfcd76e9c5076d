"""Fault-injection harness options and its report.

    pytest tests/faults                                  # CI size (a few trials per scenario)
    pytest tests/faults --fault-trials 20                # full run (or env KDPIPE_FAULT_TRIALS=20)
    KDPIPE_FAULT_REPORT=faults.json pytest tests/faults  # write trials/faults/survived/inputs as JSON

--fault-seed (env KDPIPE_FAULT_SEED) seeds every random delay, kill point and generated input.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from faultlib import REPORT


def pytest_addoption(parser) -> None:
    g = parser.getgroup("kdpipe faults")
    g.addoption("--fault-trials", type=int, default=None,
                help="kill/fault trials per scenario (default: env KDPIPE_FAULT_TRIALS, else a small CI count)")
    g.addoption("--fault-seed", type=int, default=None, help="seed of the harness (default: env KDPIPE_FAULT_SEED or 0)")


def pytest_configure(config) -> None:
    # Test modules read the counts at import time (hypothesis settings), so publish them as env now.
    n = config.getoption("--fault-trials", default=None)
    if n is not None:
        os.environ["KDPIPE_FAULT_TRIALS"] = str(n)
    s = config.getoption("--fault-seed", default=None)
    if s is not None:
        os.environ["KDPIPE_FAULT_SEED"] = str(s)
    config._kdpipe_fault_t0 = time.time()


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get("KDPIPE_FAULT_REPORT")
    if not path or not REPORT.scenarios:
        return
    rep = REPORT.to_dict()
    rep["seconds"] = round(time.time() - getattr(session.config, "_kdpipe_fault_t0", time.time()), 1)
    rep["exit_status"] = int(exitstatus)
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        rep["tests"] = {k: len(tr.stats.get(k, [])) for k in ("passed", "failed", "xfailed", "xpassed", "skipped", "error")}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(rep, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)
