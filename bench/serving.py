"""Serving overhead of the local endpoint: single-image latency through HTTP vs in-process.

    python bench/serving.py [--requests 250] [--arch efficientnet_lite0] [--image-size 224]

Both sides run the very same work, `inference.handle` on a PNG (decode, evaluation preset, forward
pass, JSON answer): once called in this process, once through a local endpoint (started the way
`kennel approve` starts it: a registered package, a background `python -m local.serving`) over one
kept-alive HTTP connection, as boto3 sends requests. The two are measured in alternating blocks so
that load from other programs on the machine falls on both alike.

Writes bench/results/serving.json (p50 and p99 of each side, the overhead at p50) and prints one
line. Target: overhead at p50 under 15%.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
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

# Same environment as the endpoint's server (local.endpoints.server_environment), set before torch
# loads, so that both sides run the forward pass with the same OpenMP behaviour.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for path in (REPO_ROOT, ENTRYPOINTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=250, help="measured requests per side (>= 200)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests per side first")
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


def sample_images(count: int = 50) -> list[bytes]:
    paths = sorted(SAMPLE_TEST.glob("*/*.png"))
    step = max(1, len(paths) // count)
    return [path.read_bytes() for path in paths[::step][:count]]


def timed(call: Callable[[bytes], None], images: list[bytes], count: int, start: int) -> list[float]:
    times = []
    for index in range(start, start + count):
        began = time.perf_counter()
        call(images[index % len(images)])
        times.append(time.perf_counter() - began)
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
    import torch

    import inference
    from local import deployment, endpoints

    with tempfile.TemporaryDirectory(prefix="kennel-bench-") as scratch:
        home = Path(scratch) / "home"
        home.mkdir()
        model_dir = build_model_package(home, args.arch, args.image_size)
        approved = deployment.approve(home, GROUP, "latest", "benchmark", endpoint_name=ENDPOINT)
        url = approved.deployments[0].url
        try:
            model = inference.model_fn(str(model_dir))
            parts = urlsplit(url)
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

            def in_process(body: bytes) -> None:
                status, _, _ = inference.handle(model, body, "image/png", None)
                assert status == 200, status

            def through_endpoint(body: bytes) -> None:
                connection.request("POST", "/invocations", body=body, headers={"Content-Type": "image/png"})
                response = connection.getresponse()
                response.read()
                assert response.status == 200, response.status

            images = sample_images()
            timed(in_process, images, args.warmup, 0)
            timed(through_endpoint, images, args.warmup, 0)
            local_times: list[float] = []
            endpoint_times: list[float] = []
            while len(local_times) < args.requests:
                block = min(args.block, args.requests - len(local_times))
                local_times += timed(in_process, images, block, len(local_times))
                endpoint_times += timed(through_endpoint, images, block, len(endpoint_times))
            connection.close()
        finally:
            endpoints.stop(home, ENDPOINT)

    local, served = summary(local_times), summary(endpoint_times)
    overhead = served["p50_ms"] / local["p50_ms"] - 1
    result = {
        "benchmark": "single-image latency: local endpoint (HTTP, keep-alive) vs in-process inference.handle",
        "model": {"arch": args.arch, "image_size": args.image_size, "classes": 10},
        "input": "Fashion-MNIST sample PNGs (28x28 grey), resized by the model's evaluation preset",
        "in_process": local,
        "endpoint": served,
        "overhead_p50": round(overhead, 4),
        "target_overhead_p50": TARGET_OVERHEAD,
        "meets_target": overhead < TARGET_OVERHEAD,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.output.with_name(f".{args.output.name}.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(args.output)
    verdict = "meets" if result["meets_target"] else "MISSES"
    print(
        f"serving {args.arch}@{args.image_size}: in-process p50 {local['p50_ms']:.1f} ms p99 {local['p99_ms']:.1f} ms; "
        f"endpoint p50 {served['p50_ms']:.1f} ms p99 {served['p99_ms']:.1f} ms; overhead at p50 "
        f"{overhead:+.1%} ({verdict} the {TARGET_OVERHEAD:.0%} target) -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
