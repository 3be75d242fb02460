"""Serving overhead of the local endpoint: single-image latency through HTTP vs in-process.

    python bench/serving.py [--requests 250] [--rounds 5] [--arch efficientnet_lite0] [--image-size 224]

Both sides run the very same work, `inference.handle` on a PNG (decode, evaluation preset, forward
pass, JSON answer): once called in a plain Python process ("in-process": the handler's own time,
taken inside that process), once through a local endpoint (started the way `kennel approve` starts
it: a registered package, a background `python -m local.serving`) over one kept-alive HTTP
connection, as boto3 sends requests (the time the client waits). The two alternate in small blocks
so that load from other programs on the machine falls on both alike.

Rounds: on these virtual machines the same forward pass runs up to 35% faster in one process than
in another started the same way, at random (measured: which of two identical processes is the fast
one changes from run to run), which would swamp a 15% target. So each round starts a fresh endpoint
server and a fresh in-process worker, and the overhead is the median over the rounds of each round's
endpoint p50 / in-process p50 - 1. Both processes get the server's environment (OMP_WAIT_POLICY,
intra-op threads from inference.configure_threads).

Writes bench/results/serving.json (p50 and p99 of each side over all rounds, each round's figures,
the overhead) and prints one line. Target: overhead at p50 under 15%.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = REPO_ROOT / "entrypoints"
SAMPLE_TEST = REPO_ROOT / "data" / "sample" / "test"
RESULTS = REPO_ROOT / "bench" / "results" / "serving.json"
GROUP, ENDPOINT = "bench-models", "bench-endpoint"
TARGET_OVERHEAD = 0.15

for path in (REPO_ROOT, ENTRYPOINTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=250, help="measured requests per side, all rounds (>= 200)")
    parser.add_argument("--rounds", type=int, default=5, help="fresh endpoint and in-process worker each round")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured requests per side and round first")
    parser.add_argument("--block", type=int, default=5, help="requests per side before switching")
    parser.add_argument(
        "--arch", default="efficientnet_lite0", help="architecture (offline weights: efficientnet_lite0)"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser


def build_model_package(home: Path, arch: str, image_size: int) -> Path:
    """A model artifact like train.py's (ImageNet backbone, a seeded head for the sample's classes),
    packed as model.tar.gz, put in the local store and registered; returns the model folder."""
    import torch

    import nets
    from local.files import tar_folder
    from local.home import store_root
    from local.registry import LocalRegistry
    from local.store import ObjectStore

    class_names = sorted(path.name for path in SAMPLE_TEST.iterdir() if path.is_dir())
    torch.manual_seed(0)
    weights = "auto" if arch == "efficientnet_lite0" else "none"
    model, _ = nets.build_model(arch, len(class_names), weights=weights)
    mean, std = nets.normalization(arch)
    model_dir = home.parent / "model"
    nets.save_artifacts(model_dir, model.eval(), nets.ModelMeta(arch, class_names, image_size, mean, std))
    tarball = home.parent / "model.tar.gz"
    tar_folder(model_dir, tarball)
    url = "s3://bench/model/model.tar.gz"
    ObjectStore(store_root(home)).put_file(tarball, url)
    registry = LocalRegistry(home)
    request = {
        "ModelPackageGroupName": GROUP,
        "ModelApprovalStatus": "PendingManualApproval",
        "InferenceSpecification": {"Containers": [{"Image": "local", "ModelDataUrl": url}]},
    }
    registry.create_model_package(request)
    return model_dir


def sample_images(count: int = 50) -> list[Path]:
    paths = sorted(SAMPLE_TEST.glob("*/*.png"))
    step = max(1, len(paths) // count)
    return paths[::step][:count]


class InProcessWorker:
    """A plain Python process that loads the model as the endpoint does (the server's environment,
    inference.model_fn) and times inference.handle itself: the in-process side."""

    SCRIPT = (
        "import sys, time\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import inference\n"
        "model = inference.model_fn(sys.argv[2])\n"
        "images = [open(path, 'rb').read() for path in sys.argv[3:]]\n"
        "for line in sys.stdin:\n"
        "    body = images[int(line)]\n"
        "    began = time.perf_counter()\n"
        "    status, _, _ = inference.handle(model, body, 'image/png', None)\n"
        "    print(time.perf_counter() - began if status == 200 else -status, flush=True)\n"
    )

    def __init__(self, model_dir: Path, images: list[Path]) -> None:
        from local.endpoints import server_environment

        self.process = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, str(ENTRYPOINTS), str(model_dir), *map(str, images)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=server_environment(),
        )

    def __call__(self, index: int) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{index}\n")
        self.process.stdin.flush()
        seconds = float(self.process.stdout.readline())
        assert seconds >= 0, f"in-process inference.handle answered {-seconds:.0f}"
        return seconds

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


class EndpointClient:
    """One kept-alive connection to the endpoint; the time the client waits for each answer."""

    def __init__(self, url: str, images: list[Path]) -> None:
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        self.images = [path.read_bytes() for path in images]

    def __call__(self, index: int) -> float:
        began = time.perf_counter()
        self.connection.request("POST", "/invocations", body=self.images[index],
                                headers={"Content-Type": "image/png"})
        response = self.connection.getresponse()
        response.read()
        seconds = time.perf_counter() - began
        assert response.status == 200, response.status
        return seconds

    def close(self) -> None:
        self.connection.close()


def measure_round(sides: dict[str, Callable[[int], float]], images: int, requests: int, warmup: int,
                  block: int) -> dict[str, list[float]]:
    """Each side's latencies over `requests` requests, the sides alternating every `block`."""
    for call in sides.values():
        for index in range(warmup):
            call(index % images)
    times: dict[str, list[float]] = {name: [] for name in sides}
    while len(times[next(iter(sides))]) < requests:
        for name, call in sides.items():
            done = len(times[name])
            times[name] += [call(index % images) for index in range(done, min(done + block, requests))]
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50) * 1000, 3),
        "p99_ms": round(percentile(values, 99) * 1000, 3),
        "mean_ms": round(statistics.fmean(values) * 1000, 3),
        "requests": len(values),
    }


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.requests < 200:
        print("bench/serving.py: --requests must be at least 200 (p99 needs the samples)", file=sys.stderr)
        return 2
    if not 1 <= args.rounds <= args.requests:
        print("bench/serving.py: --rounds must be between 1 and --requests", file=sys.stderr)
        return 2
    import torch

    from local import deployment, endpoints

    images = sample_images()
    per_round = -(-args.requests // args.rounds)
    rounds: list[dict[str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="kennel-bench-") as scratch:
        home = Path(scratch) / "home"
        home.mkdir()
        model_dir = build_model_package(home, args.arch, args.image_size)
        deployment.approve(home, GROUP, "latest", "benchmark", endpoint_name=ENDPOINT)
        try:
            for number in range(args.rounds):
                if number:  # a fresh server process for this round
                    endpoints.stop(home, ENDPOINT)
                    deployment.deploy_newest_approved(home, GROUP, ENDPOINT)
                url = endpoints.describe_endpoint(home, ENDPOINT).url
                worker, client = InProcessWorker(model_dir, images), EndpointClient(str(url), images)
                try:
                    rounds.append(measure_round({"in_process": worker, "endpoint": client}, len(images),
                                                per_round, args.warmup, args.block))
                finally:
                    worker.close()
                    client.close()
        finally:
            endpoints.stop(home, ENDPOINT)

    local = summary([t for times in rounds for t in times["in_process"]])
    served = summary([t for times in rounds for t in times["endpoint"]])
    by_round = [
        {"in_process": summary(times["in_process"]), "endpoint": summary(times["endpoint"])} for times in rounds
    ]
    for item in by_round:
        item["overhead_p50"] = round(item["endpoint"]["p50_ms"] / item["in_process"]["p50_ms"] - 1, 4)
    overhead = statistics.median(item["overhead_p50"] for item in by_round)
    result = {
        "benchmark": "single-image latency: local endpoint (HTTP, keep-alive) vs in-process inference.handle",
        "model": {"arch": args.arch, "image_size": args.image_size, "classes": 10},
        "input": "Fashion-MNIST sample PNGs (28x28 grey), resized by the model's evaluation preset",
        "in_process": local,
        "endpoint": served,
        "rounds": by_round,
        "overhead_p50": round(overhead, 4),
        "overhead_statistic": "median over the rounds (each a fresh server and worker) of endpoint p50 / in-process p50 - 1",
        "target_overhead_p50": TARGET_OVERHEAD,
        "meets_target": overhead < TARGET_OVERHEAD,
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "omp_wait_policy": endpoints.server_environment().get("OMP_WAIT_POLICY"),
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.output.with_name(f".{args.output.name}.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(args.output)
    verdict = "meets" if result["meets_target"] else "MISSES"
    each = ", ".join(f"{item['overhead_p50']:+.0%}" for item in by_round)
    print(
        f"serving {args.arch}@{args.image_size}: in-process p50 {local['p50_ms']:.1f} ms p99 {local['p99_ms']:.1f} ms; "
        f"endpoint p50 {served['p50_ms']:.1f} ms p99 {served['p99_ms']:.1f} ms; overhead at p50 {overhead:+.1%} "
        f"(median of {args.rounds} rounds: {each}; {verdict} the {TARGET_OVERHEAD:.0%} target) -> {args.output}"
    )
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
