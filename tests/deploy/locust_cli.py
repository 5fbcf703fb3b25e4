"""vfio-loadtest's command lines as Locust reads them, for the deploy tests:
what vfio-loadtest hands Locust (vfioload/cli.py), and Locust's own parser
run on it in another process (importing locust patches the importing
process with gevent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from vfioload.cli import LOCUSTFILE
from vfioload.mix import CLASS_NAMES, parse_mix

# Locust's options the deploy files rely on.
OPTIONS = (
    "master", "worker", "headless", "master_host", "master_port", "master_bind_host",
    "master_bind_port", "web_host", "web_port", "user_classes", "num_users", "spawn_rate",
    "run_time",
)  # fmt: skip

_SCRIPT = """\
import json, sys
from locust.argument_parser import get_parser
keys = json.loads(sys.argv[1])
out = []
for argv in json.load(sys.stdin):
    o = get_parser(default_config_files=[]).parse_args(argv)
    out.append({k: getattr(o, k) for k in keys})
print(json.dumps(out))
"""


def locust_argv(rest: list[str], mix: str) -> list[str]:
    """What vfio-loadtest gives Locust: the locustfile, the options it does
    not know itself (`rest`), the user classes of the mix."""
    return ["-f", str(LOCUSTFILE), *rest, *(CLASS_NAMES[k] for k in parse_mix(mix))]


def locust_options(argvs: list[list[str]], cwd: Path) -> list[dict[str, Any]]:
    """OPTIONS as Locust's parser reads each argv: no configuration file (run
    in `cwd`, an empty directory), no LOCUST_* variable. An option Locust does
    not know fails the calling test with Locust's message."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(OPTIONS)],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    options: list[dict[str, Any]] = json.loads(done.stdout)
    return options
