"""How long the default `make pipeline-run` takes on this machine, from PrepareData to the condition.

    python bench/pipeline.py

Runs the local target exactly as `make pipeline-run` does (upsert, then `kennel run --wait` with
no parameters: the bundled sample and kennel.toml's [local] settings) in a fresh state folder, so
nothing comes from the cache. Reads the execution's own step records and reports:

- the wall time from PrepareData's start to CheckTestLoss's end (target: at most 600 s on a 2-core
  machine), each step's span, and the whole command's time including the upsert;
- the machine's load average, since this machine is shared: a figure taken under load reads slow.

Writes bench/results/pipeline.json and prints one line.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results" / "pipeline.json"
TARGET_SECONDS = 600
TO_CONDITION = ("PrepareData", "Tune", "TrainWithDebugger", "Evaluate", "CheckTestLoss")


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def kennel(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KENNEL_", "SAGEMAKER_", "SM_"))}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**env, "KENNEL_HOME": str(home)}, stdin=subprocess.DEVNULL, check=False)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="kennel-bench-") as folder:
        home = Path(folder) / ".kennel"
        started = time.monotonic()
        upsert = kennel(home, "upsert")
        upsert_seconds = time.monotonic() - started
        run = kennel(home, "run", "--wait", "--json")
        total_seconds = time.monotonic() - started
        if upsert.returncode != 0 or run.returncode != 0:
            print((upsert.stderr + run.stdout + run.stderr)[-4000:], file=sys.stderr)
            return 1
        execution_id = json.loads(run.stdout)["execution_id"]
        steps_folder = home / "executions" / execution_id / "steps"
        records = {name: json.loads((steps_folder / f"{name}.json").read_text()) for name in TO_CONDITION}
        kennel(home, "endpoint", "stop", "kennel-endpoint")

    to_condition = seconds_between(records["PrepareData"]["StartTime"], records["CheckTestLoss"]["EndTime"])
    step_seconds = {name: round(seconds_between(r["StartTime"], r["EndTime"]), 2) for name, r in records.items()}
    result = {
        "benchmark": "default `make pipeline-run` (local target, bundled sample, [local] settings), no cache",
        "prepare_to_condition_seconds": round(to_condition, 2),
        "target_seconds": TARGET_SECONDS,
        "meets_target": to_condition <= TARGET_SECONDS,
        "step_seconds": step_seconds,
        "upsert_seconds": round(upsert_seconds, 2),
        "command_seconds": round(total_seconds, 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m": round(os.getloadavg()[0], 2)},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    temporary = RESULTS.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(RESULTS)
    print(f"pipeline: PrepareData -> CheckTestLoss {to_condition:.0f} s (target <= {TARGET_SECONDS} s, "
          f"{'met' if result['meets_target'] else 'MISSED'}); upsert {upsert_seconds:.0f} s; "
          f"-> {RESULTS.relative_to(REPO_ROOT)}")
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
