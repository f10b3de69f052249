#!/usr/bin/env python3
"""imgclf benchmarks: one run, one machine, the same photos for every contender.

Prints, for each of (1) the limit: raw onnxruntime (Python) on already-preprocessed tensors,
(2) imgclf's classifiers alone (ort, tract), (3) the embedded pipeline over HTTP, (4) the
distributed pipeline (imgclf-http + imgclf-worker over RabbitMQ, PostgreSQL and the S3 server)
and (5) preprocessing against Pillow: images/s, p50/p95 latency, peak RSS, and the ratio to the
limit. Writes docs/bench-results.json and docs/throughput.png.

    scripts/bench.sh        # builds the release binaries, starts the services, runs this
"""
import argparse, glob, http.client, io, json, os, resource, statistics, subprocess, sys, tempfile, time, uuid
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("IMGCLF_SHARED_DIR", os.path.join(ROOT, "..", "shared"))
sys.path.insert(0, os.path.join(SHARED, "tools"))
from reference_classify import preprocess  # the reference implementation's transform  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

MODELS = {"efficientnet-lite0": os.path.join(ROOT, "models/efficientnet-lite0"),
          "resnet18": os.path.join(SHARED, "models/resnet18-random-init")}
IMAGES = sorted(glob.glob(os.path.join(SHARED, "images/*.jpg")) + glob.glob(os.path.join(SHARED, "images/*.png")))


def pct(values, p):
    values = sorted(values)
    return values[round((len(values) - 1) * p)]


def raw_onnxruntime(model_dir, batch, seconds, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), options, providers=["CPUExecutionProvider"])
    tensors = [preprocess(p) for p in IMAGES]
    x = np.concatenate([tensors[i % len(tensors)] for i in range(batch)])
    session.run(None, {"input": x})
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        session.run(None, {"input": x})
        times.append((time.perf_counter() - t) * 1e3)
    total = time.perf_counter() - start
    return {"images_per_s": len(times) * batch / total, "p50_ms": pct(times, 0.5), "p95_ms": pct(times, 0.95),
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def imgclf_classifier(binary, backend, model_dir, batch, seconds, threads):
    out = subprocess.run([binary, backend, model_dir, str(batch), str(seconds), str(threads)],
                         stdout=subprocess.PIPE, check=True).stdout
    r = json.loads(out)
    return {"images_per_s": r["images_per_s"], "p50_ms": r["batch_p50_ms"], "p95_ms": r["batch_p95_ms"],
            "rss_mib": r["peak_rss_mib"], "preprocess_ms": r["preprocess_mean_ms"]}


def pillow_preprocess_ms(rounds=5):
    """The reference transform from bytes in memory, as imgclf's figure is taken: per photo the
    median of `rounds` runs, then the mean over the photos."""
    medians = []
    for p in IMAGES:
        data = open(p, "rb").read()
        runs = []
        for _ in range(rounds):
            t = time.perf_counter()
            preprocess(io.BytesIO(data))
            runs.append((time.perf_counter() - t) * 1e3)
        medians.append(statistics.median(runs))
    return statistics.mean(medians)


def multipart(name, data):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def vm_hwm_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# Where the CPU goes in a pipeline run: process groups by name on this machine.
CPU_GROUPS = {"imgclf-http": ("imgclf-http",), "imgclf-worker": ("imgclf-worker",),
              "S3 server": ("moto_server", "s3s-fs"), "RabbitMQ": ("beam.smp",), "PostgreSQL": ("postgres",)}


def cpu_seconds_by_group():
    ticks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        for group, names in CPU_GROUPS.items():
            if comm in (name[:15] for name in names):
                ticks[group] = ticks.get(group, 0) + int(fields[11]) + int(fields[12])  # utime + stime
    me = os.times()
    seconds = {group: t / os.sysconf("SC_CLK_TCK") for group, t in ticks.items()}
    seconds["load generator (Python)"] = me.user + me.system
    return seconds


def pipeline(http_bin, worker_bin, env_extra, tasks, workers):
    """Starts imgclf-http (+ workers), uploads `tasks` photos 8 at a time, waits for every
    result. Throughput counts from the first upload to the last result."""
    work = tempfile.mkdtemp(prefix="imgclf-bench-")
    port = 18000 + os.getpid() % 1000
    env = dict(os.environ, IMGCLF_ADDR=f"127.0.0.1:{port}", IMGCLF_DATA_DIR=os.path.join(work, "data"),
               RUST_LOG="warn", IMGCLF_MAX_QUEUE_DEPTH="0", **env_extra)
    procs = [subprocess.Popen([http_bin], env=env, cwd=work)]
    metrics_port = port + 1  # the first worker's metrics; the embedded service serves its own
    procs += [subprocess.Popen([worker_bin], env=dict(env, IMGCLF_METRICS_ADDR=f"127.0.0.1:{metrics_port + i}"), cwd=work)
              for i in range(workers)]
    try:
        deadline = time.time() + 180
        while True:
            try:
                if request(port, "GET", "/ready")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit("imgclf-http did not become ready")
            time.sleep(0.2)
        photos = [(os.path.basename(p), open(p, "rb").read()) for p in IMAGES]
        def upload(i):
            name, data = photos[i % len(photos)]
            body, ctype = multipart(name, data)
            status, answer = request(port, "POST", "/api/upload-image", body, {"Content-Type": ctype})
            assert status == 202, answer
            return json.loads(answer)["task_id"]
        cpu_before = cpu_seconds_by_group()
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(upload, range(tasks)))
        # Oldest first, one task at a time: results come roughly in upload order, so this costs
        # about one status request per task, not a storm of them competing for the two cores.
        latencies = []
        for task_id in ids:
            while True:
                status = json.loads(request(port, "GET", f"/api/task-status/{task_id}")[1])
                if status["state"] in ("SUCCESS", "FAILURE"):
                    break
                time.sleep(0.01)
            assert status["state"] == "SUCCESS", status
            latencies.append(status["updated_at_ms"] - status["created_at_ms"])
        total = time.perf_counter() - start
        cpu_after = cpu_seconds_by_group()
        cpu_ms = {g: round((cpu_after[g] - cpu_before.get(g, 0)) * 1e3 / tasks, 2) for g in cpu_after}
        print(f"  CPU per image (ms): {cpu_ms}, wall {total * 1e3 / tasks:.2f} ms per image on {os.cpu_count()} cores",
              flush=True)
        rss = max(vm_hwm_mib(p.pid) for p in procs[1:] or procs)
        metrics = request(metrics_port if workers else port, "GET", "/metrics")[1].decode()
        value = lambda name: float(next(l.split()[1] for l in metrics.splitlines() if l.startswith(name + " ")))
        mean_batch = value("image_batch_size_sum") / max(value("image_batch_size_count"), 1)
        print(f"  mean batch the model ran: {mean_batch:.2f}", flush=True)
        return {"images_per_s": tasks / total, "p50_ms": pct(latencies, 0.5), "p95_ms": pct(latencies, 0.95), "rss_mib": rss,
                "cpu_ms_per_image": cpu_ms, "mean_batch": round(mean_batch, 2)}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release"))
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for every contender")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--models", default=",".join(MODELS), help="models for the classifier rows")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each pipeline; the median one is kept")
    ap.add_argument("--skip-distributed", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/bench-results.json"), help="JSON results")
    a = ap.parse_args()
    bench = os.path.join(a.bin_dir, "examples", "bench_classifier")
    http_bin, worker_bin = os.path.join(a.bin_dir, "imgclf-http"), os.path.join(a.bin_dir, "imgclf-worker")
    batches = [int(b) for b in a.batches.split(",")]
    results = {"machine": f"{os.cpu_count()} cores", "threads": a.threads, "rows": []}
    rows = results["rows"]

    def median_run(run):
        runs = sorted((run() for _ in range(a.repeat)), key=lambda r: r["images_per_s"])
        median = runs[len(runs) // 2]
        median["runs_images_per_s"] = [round(r["images_per_s"], 1) for r in runs]
        return median

    def add(what, model, batch, r):
        rows.append(dict(what=what, model=model, batch=batch, **r))
        print(f"{what:34s} {model:18s} batch {batch:>2}: {r['images_per_s']:7.1f} img/s  "
              f"p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  RSS {r['rss_mib']:6.0f} MiB", flush=True)

    for model in a.models.split(","):
        model_dir = MODELS[model]
        for batch in batches:
            add("onnxruntime (Python, the limit)", model, batch, raw_onnxruntime(model_dir, batch, a.seconds, a.threads))
            for backend in ("ort", "tract"):
                add(f"imgclf classifier ({backend})", model, batch,
                    imgclf_classifier(bench, backend, model_dir, batch, a.seconds, a.threads))

    lite = MODELS["efficientnet-lite0"]
    common = {"IMGCLF_CLASSIFIER": "ort", "IMGCLF_INTRA_THREADS": str(a.threads), "IMGCLF_MODEL": lite,
              "IMGCLF_PREPROCESS_THREADS": "1", "IMGCLF_MAX_BATCH": "8"}
    add("embedded pipeline over HTTP (ort)", "efficientnet-lite0", 8,
        median_run(lambda: pipeline(http_bin, worker_bin, common, a.tasks, 0)))
    # What `cargo run --release -p imgclf-http` gives: tract, every setting at its default.
    add("embedded, the defaults (tract)", "efficientnet-lite0", 8,
        median_run(lambda: pipeline(http_bin, worker_bin, {"IMGCLF_MODEL": lite}, a.tasks, 0)))
    if not a.skip_distributed:
        # Over the test suite's S3 server (moto, Python) and, where bench.sh started it, over a
        # compiled one (s3s-fs, Rust), closer to what MinIO or AWS cost the machine.
        s3_servers = {"moto": os.environ["IMGCLF_TEST_S3"]}
        if os.environ.get("IMGCLF_BENCH_S3S"):
            s3_servers["s3s-fs"] = os.environ["IMGCLF_BENCH_S3S"]
        for s3_name, endpoint in s3_servers.items():
            def distributed():
                env = dict(common,
                    IMGCLF_QUEUE=os.environ["IMGCLF_TEST_AMQP"], IMGCLF_QUEUE_NAME=f"bench-{uuid.uuid4().hex}",
                    IMGCLF_RESULTS=os.environ["IMGCLF_TEST_POSTGRES"], IMGCLF_STORAGE=f"s3://bench-{uuid.uuid4().hex}",
                    IMGCLF_S3_ENDPOINT=endpoint, IMGCLF_S3_ACCESS_KEY="test", IMGCLF_S3_SECRET_KEY="testtest")
                return pipeline(http_bin, worker_bin, env, a.tasks, 1)
            add(f"distributed (ort, AMQP, S3 {s3_name})", "efficientnet-lite0", 8, median_run(distributed))

    pillow = pillow_preprocess_ms()
    ours = [r["preprocess_ms"] for r in rows if "preprocess_ms" in r]
    results["preprocess"] = {"pillow_ms": pillow, "imgclf_ms": statistics.mean(ours), "speedup": pillow / statistics.mean(ours)}
    print(f"\npreprocessing per image: Pillow {pillow:.2f} ms, imgclf {statistics.mean(ours):.2f} ms "
          f"({pillow / statistics.mean(ours):.2f}x)")

    limit = max(r["images_per_s"] for r in rows if r["what"].startswith("onnxruntime") and r["model"] == "efficientnet-lite0")
    print(f"\nratios to the limit (best raw onnxruntime, EfficientNet-Lite0: {limit:.1f} img/s):")
    raw = {r["batch"]: r["images_per_s"] for r in rows
           if r["what"].startswith("onnxruntime") and r["model"] == "efficientnet-lite0"}
    for r in rows:
        if r["model"] == "efficientnet-lite0":
            r["ratio_to_limit"] = r["images_per_s"] / limit
            same = f"  ({r['images_per_s'] / raw[r['batch']]:.2f} of raw onnxruntime at batch {r['batch']})" \
                if r["batch"] in raw else ""
            runs = f"  runs: {r['runs_images_per_s']} img/s" if "runs_images_per_s" in r else ""
            print(f"  {r['what']:34s} batch {r['batch']:>2}: {r['ratio_to_limit']:.2f}{same}{runs}")
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    if len(batches) < 2 or a.models != ",".join(MODELS):
        return  # a partial run: keep the plot of the last full one
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, model in zip(axes, MODELS):
            for what in sorted({r["what"] for r in rows if "classifier" in r["what"] or "onnxruntime" in r["what"]}):
                pts = [(r["batch"], r["images_per_s"]) for r in rows if r["what"] == what and r["model"] == model]
                ax.plot(*zip(*pts), marker="o", label=what)
            ax.set_title(model)
            ax.set_xlabel("batch size")
            ax.set_ylabel("images/s")
            ax.set_xticks(batches)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
        fig.savefig(os.path.join(ROOT, "docs/throughput.png"), dpi=110)
    except ImportError:
        print("(matplotlib missing: no plot)")


if __name__ == "__main__":
    main()
