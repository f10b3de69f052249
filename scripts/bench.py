#!/usr/bin/env python3
"""imgclf benchmarks: one run, one machine, the same photos for every contender.

Measures the bound of a pipeline on this machine and how close imgclf comes to it:

    bound = cores / (t_pre + t_inf)

t_pre is imgclf's own decode + preprocess time per photo (mean over the benchmark photos), t_inf
raw onnxruntime's (Python) single-threaded time per image at its best batch size, both measured
here in this run. For each model it then runs the model's instances alone as the service starts
them (examples/bench_instances: photos from memory, no HTTP, images or records: what the
embedded service could reach if its own work cost nothing), the embedded `imgclf-http` and the
distributed deployment (imgclf-http + imgclf-worker over RabbitMQ, PostgreSQL and a compiled S3
server) under 16 clients with no tuning flag set but the backend, one client for latency, and
compares preprocessing with Pillow (the reference transform) on the 1-4 megapixel photos, and
measures each result store alone (examples/bench_results). Prints every ratio against its
target and, for the distributed runs, the ceiling that the servers' own CPU on these cores sets;
writes docs/bench-results.json and docs/throughput.png.

    scripts/bench.sh        # builds the release binaries, starts the services, runs this
"""
import argparse, atexit, glob, io, json, os, platform, shutil, statistics, subprocess, sys, tempfile, time, uuid
import http.client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("IMGCLF_SHARED_DIR", os.path.join(ROOT, "..", "shared"))
sys.path.insert(0, os.path.join(SHARED, "tools"))
from reference_classify import preprocess  # the reference implementation's transform  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from PIL import Image  # noqa: E402

MODELS = {"efficientnet-lite0": os.path.join(ROOT, "models/efficientnet-lite0"),
          "resnet18": os.path.join(SHARED, "models/resnet18-random-init")}

TARGETS = {"embedded": 0.90, "distributed": 0.80, "preprocess_speedup": 3.0, "ort_vs_raw": 0.95,
           "latency_excess_ms": 2.0}


def pct(values, p):
    values = sorted(values)
    return values[round((len(values) - 1) * p)]


def cpu_info():
    """The CPU by name, its vector extensions that matter to inference, and the cores."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]
    return {"model": model, "flags": [f for f in wanted if f in flags], "cores": os.cpu_count()}


def benchmark_photos(out_dir):
    """The shared photos (0.1-0.9 MP) and 1-4 MP photos made from the shared ones as a camera
    would store them (baseline 4:2:0 JPEG at quality 90; one progressive, one 4:4:4, one portrait):
    the large photos are what a phone uploads, and where preprocessing costs the most."""
    os.makedirs(out_dir, exist_ok=True)
    for p in glob.glob(os.path.join(SHARED, "images/*.jpg")) + glob.glob(os.path.join(SHARED, "images/*.png")):
        shutil.copy(p, out_dir)
    big = Image.open(os.path.join(SHARED, "images/kde_coldripple_2560x1600.jpg")).convert("RGB")
    dog = Image.open(os.path.join(SHARED, "images/darknet_dog.jpg")).convert("RGB")
    hubble = Image.open(os.path.join(SHARED, "images/skimage_hubble_deep_field.jpg")).convert("RGB")
    made = {
        "large_coldripple_1280x800.jpg": (big.resize((1280, 800), Image.LANCZOS), {}),
        "large_coldripple_1632x1020.jpg": (big.resize((1632, 1020), Image.LANCZOS), {}),
        "large_coldripple_2048x1280.jpg": (big.resize((2048, 1280), Image.LANCZOS), {}),
        "large_coldripple_portrait_1200x1600.jpg": (big.crop((680, 0, 1880, 1600)).transpose(Image.ROTATE_90)
                                                    .resize((1200, 1600), Image.LANCZOS), {}),
        "large_coldripple_progressive_1920x1200.jpg": (big.resize((1920, 1200), Image.LANCZOS), {"progressive": True}),
        "large_dog_444_1536x1152.jpg": (dog.resize((1536, 1152), Image.BICUBIC), {"subsampling": 0}),
        "large_hubble_2000x1744.jpg": (hubble.resize((2000, 1744), Image.BICUBIC), {}),
    }
    for name, (im, options) in made.items():
        im.save(os.path.join(out_dir, name), quality=90, **options)
    shutil.copy(os.path.join(SHARED, "images/kde_coldripple_2560x1600.jpg"), os.path.join(out_dir, "large_coldripple_2560x1600.jpg"))
    os.remove(os.path.join(out_dir, "kde_coldripple_2560x1600.jpg"))  # now among the large ones
    return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir))


def megapixels(path):
    with Image.open(path) as im:
        return im.size[0] * im.size[1] / 1e6


def raw_onnxruntime(model_dir, photos, batch, seconds, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    tensors = [preprocess(p) for p in photos[:batch]]
    x = np.concatenate([tensors[i % len(tensors)] for i in range(batch)])
    session.run(None, {name: x})
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - t) * 1e3)
    total = time.perf_counter() - start
    return {"images_per_s": len(times) * batch / total, "ms_per_image": total * 1e3 / (len(times) * batch),
            "p50_ms": pct(times, 0.5), "p95_ms": pct(times, 0.95)}


def raw_onnxruntime_on_every_core(model_dir, photos, batch, seconds, cores):
    """Raw onnxruntime, single-threaded, in one process per core at once: how inference scales
    across this machine's cores (shared caches, memory bandwidth, the host's other guests), which
    the bound's `cores x` assumes is perfect."""
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        runs = pool.starmap(raw_onnxruntime, [(model_dir, photos, batch, seconds, 1)] * cores)
    return sum(r["images_per_s"] for r in runs)


def imgclf_classifier(binary, backend, model_dir, photo_dir, batch, seconds, threads):
    out = subprocess.run([binary, backend, model_dir, str(batch), str(seconds), str(threads)],
                         env=dict(os.environ, IMGCLF_BENCH_PHOTOS=photo_dir, RUST_LOG="warn"),
                         stdout=subprocess.PIPE, check=True).stdout
    r = json.loads(out)
    return {"images_per_s": r["images_per_s"], "p50_ms": r["batch_p50_ms"], "p95_ms": r["batch_p95_ms"],
            "rss_mib": r["peak_rss_mib"], "preprocess_ms_by_photo": r["preprocess_ms_by_photo"]}


def instances_alone(binary, model_dir, images, photos, repeat):
    """The model's instances as the embedded service starts them, fed photos from memory with
    nothing else running (examples/bench_instances): the median of `repeat` runs."""
    env = dict(os.environ, IMGCLF_CLASSIFIER="ort", IMGCLF_MODEL=model_dir, RUST_LOG="warn")
    for name in ("IMGCLF_INFERENCE_THREADS", "IMGCLF_MAX_BATCH"):
        env.pop(name, None)
    return median_run(json.loads(subprocess.run([binary, str(images), *photos], env=env, stdout=subprocess.PIPE,
                                                check=True).stdout) for _ in range(repeat))


def median_run(runs):
    """The run of median throughput, with every run's throughput beside it."""
    runs = sorted(runs, key=lambda r: r["images_per_s"])
    r = runs[len(runs) // 2]
    r["runs_images_per_s"] = [round(x["images_per_s"], 1) for x in runs]
    return r


def pillow_preprocess_ms(photos, rounds=7):
    """The reference transform from bytes in memory, as imgclf's figure is taken: per photo the
    median of `rounds` runs after one untimed."""
    result = {}
    for p in photos:
        data = open(p, "rb").read()
        preprocess(io.BytesIO(data))
        runs = []
        for _ in range(rounds):
            t = time.perf_counter()
            preprocess(io.BytesIO(data))
            runs.append((time.perf_counter() - t) * 1e3)
        result[os.path.basename(p)] = statistics.median(runs)
    return result


def preprocessing_side_by_side(binary, model_dir, photo_dir, photos, rounds=3):
    """Pillow's and imgclf's per-photo times, taken round by round one after the other (per photo,
    the median over the rounds): a shared host's speed drifts by tens of percent within minutes,
    so two figures taken apart compare the host's moments, not the two implementations."""
    pillow_runs, ours_runs = [], []
    for _ in range(rounds):
        pillow_runs.append(pillow_preprocess_ms(photos))
        ours_runs.append(imgclf_classifier(binary, "ort", model_dir, photo_dir, 1, 0.2, 1)["preprocess_ms_by_photo"])

    def median(runs):
        return {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    return median(pillow_runs), median(ours_runs)


def request(port, method, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path)
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
              "S3 server": ("moto_server", "s3s-fs"), "RabbitMQ": ("beam.smp",), "PostgreSQL": ("postgres",),
              "load generator": ("bench_load",)}


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
                # utime + stime, and those of its children that ended: PostgreSQL's backends of
                # connections that closed count in the postmaster's.
                ticks[group] = ticks.get(group, 0) + sum(int(fields[i]) for i in (11, 12, 13, 14))
    me = os.times()
    seconds = {group: t / os.sysconf("SC_CLK_TCK") for group, t in ticks.items()}
    seconds["load generator"] = seconds.get("load generator", 0) + me.children_user + me.children_system
    return seconds


LEFTOVERS = []
atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in LEFTOVERS])


class Service:
    """imgclf-http (+ workers) started on `env`, stopped on exit."""

    def __init__(self, bins, env_extra, workers):
        self.work = tempfile.mkdtemp(prefix="imgclf-bench-")
        self.port = 18000 + os.getpid() % 1000
        env = {k: v for k, v in os.environ.items() if k not in ("IMGCLF_INFERENCE_THREADS", "IMGCLF_MAX_BATCH")}
        # The service as it ships (INFO logs, here to a file), with no limit on waiting jobs
        # so that the burst is all accepted.
        env.update(IMGCLF_ADDR=f"127.0.0.1:{self.port}", IMGCLF_DATA_DIR=os.path.join(self.work, "data"),
                   IMGCLF_MAX_QUEUE_DEPTH="0", NO_COLOR="1", **env_extra)
        self.logs = [os.path.join(self.work, f"{name}.log") for name in ["http"] + ["worker"] * workers]
        self.procs = [subprocess.Popen([bins["http"]], env=env, cwd=self.work, stderr=open(self.logs[0], "w"),
                                       stdout=subprocess.DEVNULL)]
        self.procs += [subprocess.Popen([bins["worker"]], env=dict(env, IMGCLF_METRICS_ADDR=f"127.0.0.1:{self.port + 1 + i}"),
                                        cwd=self.work, stderr=open(self.logs[1 + i], "w"), stdout=subprocess.DEVNULL)
                       for i in range(workers)]
        self.metrics_port = self.port + 1 if workers else self.port

    def __enter__(self):
        try:
            return self._wait_ready()
        except BaseException:
            # Not inside the `with` yet: nothing else would stop what was started.
            self.__exit__(None, None, None)
            raise

    def _wait_ready(self):
        deadline = time.time() + 300
        while True:
            try:
                # A worker serves its metrics once its model is loaded.
                if request(self.port, "GET", "/ready")[0] == 200 and \
                        (self.metrics_port == self.port or request(self.metrics_port, "GET", "/health")[0] == 200):
                    return self
            except OSError:
                pass
            if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                raise SystemExit("the service did not become ready")
            time.sleep(0.2)

    def model_choice(self):
        """What the tuning chose (instances at start, batch) and instances at the end, the one on
        every core included."""
        text = "".join(open(log).read() for log in self.logs)
        import re
        start = re.search(r"classifier: (\d+) instance\(s\), batches of up to (\d+)", text)
        grown = re.findall(r"instance (\d+) of at most", text)
        if not start:
            return None
        # One more on every core for an image that finds the others idle (ort, unset count).
        wide = "one more instance, on all" in text
        # The caps chosen under load, in turn (the first choice and each change).
        under_load = [int(c) for c in re.findall(r"batches of up to (\d+) under load", text)]
        return {"instances_at_start": int(start.group(1)), "max_batch": int(start.group(2)),
                "instances": max([int(start.group(1))] + [int(g) for g in grown]) + wide, "wide": wide,
                "under_load": under_load}

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=60)
        # Deleted at the end of the whole run, not now: on an ext4 without a journal, each file
        # created within about 30 s of many deletions scans past the deleted inodes, and the
        # next service's uploads would pay for this one's cleanup (0.4-0.7 ms of CPU per image
        # measured on a 2-core AMD EPYC).
        LEFTOVERS.append(self.work)

    def metric(self, name):
        text = request(self.metrics_port, "GET", "/metrics")[1].decode()
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))

    def rss_mib(self):
        return {("worker" if i else "http"): round(vm_hwm_mib(p.pid), 1) for i, p in enumerate(self.procs)}


def result_stores(binary):
    """Each result store alone (examples/bench_results): the three writes of an image, 64 tasks
    in flight. SQLite on the disk the embedded service uses; PostgreSQL where the tests have it,
    with its server's CPU per task beside the client's."""
    work = tempfile.mkdtemp(prefix="imgclf-bench-store-")
    LEFTOVERS.append(work)
    stores = {"sqlite": (f"sqlite://{work}/imgclf.db", None)}
    if os.environ.get("IMGCLF_TEST_POSTGRES"):
        stores["postgres"] = (os.environ["IMGCLF_TEST_POSTGRES"], "PostgreSQL")
    out = {}
    for name, (url, server) in stores.items():
        before = cpu_seconds_by_group()
        r = json.loads(subprocess.run([binary, url, "20000", "64"], stdout=subprocess.PIPE, check=True).stdout)
        served = ""
        if server:
            r["server_cpu_ms_per_task"] = (cpu_seconds_by_group().get(server, 0) - before.get(server, 0)) * 1e3 / r["tasks"]
            served = f", {r['server_cpu_ms_per_task']:.3f} ms of its server's"
        out[name] = r
        print(f"result store {name:8s} {r['tasks_per_s']:8.0f} tasks/s, {r['cpu_ms_per_task']:.3f} ms of "
              f"this process's CPU per task{served} (create, start, complete; 64 in flight)", flush=True)
    return out


def load(bins, service, tasks, clients, photos):
    out = subprocess.run([bins["load"], f"http://127.0.0.1:{service.port}", str(tasks), str(clients), *photos],
                         stdout=subprocess.PIPE, check=True).stdout
    return json.loads(out)


def pipeline(bins, env_extra, workers, tasks, clients, photos):
    with Service(bins, env_extra, workers) as service:
        # A warm-up round (the first uploads open files, connections and database pages).
        load(bins, service, min(tasks, 2 * len(photos)), clients, photos)
        cpu_before = cpu_seconds_by_group()
        batches_before = (service.metric("image_batch_size_sum"), service.metric("image_batch_size_count"))
        r = load(bins, service, tasks, clients, photos)
        cpu_after = cpu_seconds_by_group()
        r["cpu_ms_per_image"] = {g: round((cpu_after[g] - cpu_before.get(g, 0)) * 1e3 / tasks, 2) for g in cpu_after}
        images = service.metric("image_batch_size_sum") - batches_before[0]
        runs = service.metric("image_batch_size_count") - batches_before[1]
        r["mean_batch"] = round(images / max(runs, 1), 2)
        r["rss_mib"] = service.rss_mib()
        r["model"] = service.model_choice()
        return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release"))
    ap.add_argument("--seconds", type=float, default=5, help="per classifier measurement")
    ap.add_argument("--tasks", type=int, default=600, help="uploads per pipeline run")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeat", type=int, default=3, help="runs of each pipeline; the median one is kept")
    ap.add_argument("--skip-distributed", action="store_true")
    ap.add_argument("--skip-tract", action="store_true", help="skip the tract rows (information only)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/bench-results.json"))
    a = ap.parse_args()
    # The services run from a folder of their own: a relative path would be looked up there.
    a.bin_dir = os.path.abspath(a.bin_dir)
    missing = [v for v in ("IMGCLF_TEST_AMQP", "IMGCLF_TEST_POSTGRES", "IMGCLF_BENCH_S3S") if not os.environ.get(v)]
    if not a.skip_distributed and missing:
        raise SystemExit(f"the distributed runs need {', '.join(missing)} (scripts/bench.sh sets them); "
                         "or pass --skip-distributed")
    bins = {"http": os.path.join(a.bin_dir, "imgclf-http"), "worker": os.path.join(a.bin_dir, "imgclf-worker"),
            "classifier": os.path.join(a.bin_dir, "examples", "bench_classifier"),
            "load": os.path.join(a.bin_dir, "examples", "bench_load"),
            "instances": os.path.join(a.bin_dir, "examples", "bench_instances"),
            "results": os.path.join(a.bin_dir, "examples", "bench_results")}
    batches = [int(b) for b in a.batches.split(",")]
    cores = os.cpu_count()
    photo_dir = os.path.join(tempfile.gettempdir(), "imgclf-bench-photos")
    shutil.rmtree(photo_dir, ignore_errors=True)
    photos = benchmark_photos(photo_dir)
    large = [p for p in photos if 1.0 <= megapixels(p) <= 4.2]
    cpu = cpu_info()
    # The references' versions: Pillow's speed on the same photos has moved between releases.
    versions = {"pillow": Image.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__}
    results = {"cpu": cpu, "versions": versions,
               "photos": {os.path.basename(p): round(megapixels(p), 2) for p in photos}, "models": {}}
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores, {' '.join(cpu['flags'])}")
    print("references: " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    print(f"photos: {len(photos)} ({len(large)} of 1-4 MP), {min(results['photos'].values())}-"
          f"{max(results['photos'].values())} MP, mean {statistics.mean(results['photos'].values()):.2f} MP\n", flush=True)
    verdicts = []

    def verdict(what, value, target, higher_is_better=True, unit=""):
        ok = value >= target if higher_is_better else value <= target
        verdicts.append((what, value, target, ok, unit, higher_is_better))

    for model in a.models.split(","):
        model_dir = MODELS[model]
        m = results["models"][model] = {"classifier": []}
        print(f"== {model}", flush=True)
        raw = {}
        for batch in batches:
            raw[batch] = raw_onnxruntime(model_dir, photos, batch, a.seconds, 1)
            ours = imgclf_classifier(bins["classifier"], "ort", model_dir, photo_dir, batch, a.seconds, 1)
            m["classifier"].append({"batch": batch, "raw": raw[batch], "ort": {k: v for k, v in ours.items() if k != "preprocess_ms_by_photo"}})
            print(f"  batch {batch:>2}, 1 thread: onnxruntime {raw[batch]['images_per_s']:6.1f} img/s, imgclf ort "
                  f"{ours['images_per_s']:6.1f} img/s ({ours['images_per_s'] / raw[batch]['images_per_s']:.2f}), RSS {ours['rss_mib']:.0f} MiB", flush=True)
            if not a.skip_tract:
                tract = imgclf_classifier(bins["classifier"], "tract", model_dir, photo_dir, batch, a.seconds, 1)
                m["classifier"][-1]["tract"] = {k: v for k, v in tract.items() if k != "preprocess_ms_by_photo"}
                print(f"           tract {tract['images_per_s']:6.1f} img/s", flush=True)
            pre_by_photo = ours["preprocess_ms_by_photo"]
        best = min(raw, key=lambda b: raw[b]["ms_per_image"])
        t_inf, t_pre = raw[best]["ms_per_image"], statistics.mean(pre_by_photo.values())
        bound = cores / (t_pre + t_inf) * 1e3
        m.update(t_inf_ms=t_inf, t_inf_batch=best, t_pre_ms=t_pre, bound_images_per_s=bound)
        print(f"  t_inf {t_inf:.2f} ms (raw onnxruntime, 1 thread, batch {best}), t_pre {t_pre:.2f} ms "
              f"(imgclf, mean over the photos): bound {cores} / {t_pre + t_inf:.2f} ms = {bound:.1f} img/s", flush=True)
        at_once = raw_onnxruntime_on_every_core(model_dir, photos, best, a.seconds, cores)
        m["raw_on_every_core"] = {"images_per_s": at_once, "scaling": at_once / (cores * raw[best]["images_per_s"])}
        print(f"  raw onnxruntime on all {cores} cores at once (a process each, batch {best}): {at_once:.1f} img/s = "
              f"{m['raw_on_every_core']['scaling']:.2f} of {cores} x one alone (the bound assumes 1.00)", flush=True)
        alone = instances_alone(bins["instances"], model_dir, a.tasks, photos, a.repeat)
        alone["ratio_to_bound"] = alone["images_per_s"] / bound
        m["instances_alone"] = alone
        print(f"  the instances alone, tuned as in the service (no HTTP, images or records): {alone['images_per_s']:.1f} img/s = "
              f"{alone['ratio_to_bound']:.2f} of the bound (runs {alone['runs_images_per_s']}), "
              f"{alone['cpu_ms_per_image']:.2f} ms of CPU per image", flush=True)
        for row in m["classifier"]:
            verdict(f"{model}: ort classifier / raw onnxruntime, batch {row['batch']}",
                    row["ort"]["images_per_s"] / row["raw"]["images_per_s"], TARGETS["ort_vs_raw"])

        def run(name, env, workers, tasks, clients):
            r = median_run(pipeline(bins, dict(env, IMGCLF_MODEL=model_dir), workers, tasks, clients, photos)
                           for _ in range(a.repeat if clients > 1 else 1))
            r["ratio_to_bound"] = r["images_per_s"] / bound
            m[name] = r
            print(f"  {name:38s} {r['images_per_s']:6.1f} img/s = {r['ratio_to_bound']:.2f} of the bound "
                  f"(runs {r['runs_images_per_s']}), mean batch {r['mean_batch']}, RSS {r['rss_mib']} MiB, model {r['model']}\n"
                  f"      CPU ms per image: {r['cpu_ms_per_image']}", flush=True)
            return r

        ort_env = {"IMGCLF_CLASSIFIER": "ort"}
        r = run("embedded (ort)", ort_env, 0, a.tasks, a.clients)
        verdict(f"{model}: embedded / bound", r["ratio_to_bound"], TARGETS["embedded"])
        # What the service adds to the model's instances (HTTP, the stored image, the records,
        # the hand-offs between threads): the rest of the gap to the bound is the machine's.
        r["own_work_ms_per_image"] = round(r["cpu_ms_per_image"]["imgclf-http"] - alone["cpu_ms_per_image"], 2)
        print(f"  the service's own work: {r['own_work_ms_per_image']:.2f} ms of CPU per image beyond the instances alone, "
              f"{alone['ratio_to_bound'] - r['ratio_to_bound']:.2f} of the bound below them", flush=True)
        # The reference for memory (and speed): the fixed defaults before self-tuning, one
        # instance and batches of up to 8.
        before = run("embedded (ort), fixed 1 x batch 8", dict(ort_env, IMGCLF_INFERENCE_THREADS="1", IMGCLF_MAX_BATCH="8"),
                     0, a.tasks, a.clients)
        weights_mib = os.path.getsize(os.path.join(model_dir, "model.onnx")) / 2**20
        extra = (r["model"] or {}).get("instances", cores) - 1
        allowance = before["rss_mib"]["http"] + extra * weights_mib
        m["memory"] = {"rss_mib": r["rss_mib"]["http"], "fixed_defaults_rss_mib": before["rss_mib"]["http"],
                       "weights_mib": weights_mib, "extra_instances": extra, "allowance_mib": allowance}
        print(f"  peak RSS {r['rss_mib']['http']:.0f} MiB; the fixed defaults' {before['rss_mib']['http']:.0f} MiB + "
              f"{extra} x {weights_mib:.0f} MiB of weights = {allowance:.0f} MiB", flush=True)
        verdict(f"{model}: peak RSS, embedded", r["rss_mib"]["http"], round(allowance, 1), False, " MiB")
        if not a.skip_distributed:
            def distributed_env():
                return dict(ort_env, IMGCLF_QUEUE=os.environ["IMGCLF_TEST_AMQP"], IMGCLF_QUEUE_NAME=f"bench-{uuid.uuid4().hex}",
                            IMGCLF_RESULTS=os.environ["IMGCLF_TEST_POSTGRES"], IMGCLF_STORAGE=f"s3://bench-{uuid.uuid4().hex}",
                            IMGCLF_S3_ENDPOINT=os.environ["IMGCLF_BENCH_S3S"], IMGCLF_S3_ACCESS_KEY="test",
                            IMGCLF_S3_SECRET_KEY="testtest")
            r = run("distributed (ort, AMQP, PG, s3s-fs)", distributed_env(), 1, a.tasks, a.clients)
            verdict(f"{model}: distributed / bound", r["ratio_to_bound"], TARGETS["distributed"])
            # The servers share these cores: even if imgclf's own work cost nothing, their CPU per
            # image caps the pipeline below the bound.
            servers = sum(r["cpu_ms_per_image"].get(g, 0) for g in ("S3 server", "PostgreSQL", "RabbitMQ"))
            r["servers_ms_per_image"] = round(servers, 2)
            r["ceiling_ratio"] = (t_pre + t_inf) / (t_pre + t_inf + servers)
            print(f"  the S3, PostgreSQL and RabbitMQ servers took {servers:.2f} ms of these cores per image: with imgclf's "
                  f"own work free, the pipeline could reach {r['ceiling_ratio']:.2f} of the bound", flush=True)
            r = run("distributed, one client", distributed_env(), 1, 3 * len(photos), 1)
            print(f"  distributed, one client: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms (the records); "
                  f"as the client sees it, upload to result: p50 {r['seen_p50_ms']:.1f} ms, p95 {r['seen_p95_ms']:.1f} ms", flush=True)
        if not a.skip_tract:
            run("embedded (tract)", {"IMGCLF_CLASSIFIER": "tract"}, 0, a.tasks, a.clients)

        # One client: each photo's latency against its own t_pre + t_inf (batch 1, as it runs).
        r = run("embedded (ort), one client", ort_env, 0, 3 * len(photos), 1)
        t_inf1 = raw[1]["ms_per_image"] if 1 in raw else t_inf
        excess = {name: statistics.median(ms) - (pre_by_photo[name] + t_inf1) for name, ms in r["latency_ms_by_photo"].items()}
        r["excess_ms_by_photo"] = excess
        print(f"  one client: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms (the records; as the client sees it, "
              f"upload to result: p50 {r['seen_p50_ms']:.1f} ms, p95 {r['seen_p95_ms']:.1f} ms); above t_pre + t_inf (batch 1: "
              f"{t_inf1:.2f} ms): median {statistics.median(excess.values()):+.2f} ms, worst {max(excess.values()):+.2f} ms "
              f"({max(excess, key=excess.get)})", flush=True)
        verdict(f"{model}: latency above t_pre + t_inf, worst photo", max(excess.values()), TARGETS["latency_excess_ms"], False, " ms")
        print(flush=True)

    pillow, imgclf_pre = preprocessing_side_by_side(bins["classifier"], MODELS["efficientnet-lite0"], photo_dir, photos)
    ours_large = statistics.mean(imgclf_pre[os.path.basename(p)] for p in large)
    pillow_large = statistics.mean(pillow[os.path.basename(p)] for p in large)
    ours_all, pillow_all = statistics.mean(imgclf_pre.values()), statistics.mean(pillow.values())
    results["preprocess"] = {"pillow_ms_by_photo": pillow, "imgclf_ms_by_photo": imgclf_pre,
                             "large": {"pillow_ms": pillow_large, "imgclf_ms": ours_large, "speedup": pillow_large / ours_large},
                             "all": {"pillow_ms": pillow_all, "imgclf_ms": ours_all, "speedup": pillow_all / ours_all}}
    print(f"preprocessing per photo, 1-4 MP: Pillow {pillow_large:.2f} ms, imgclf {ours_large:.2f} ms ({pillow_large / ours_large:.2f}x); "
          f"all photos: {pillow_all:.2f} / {ours_all:.2f} ms ({pillow_all / ours_all:.2f}x)")
    verdict("preprocessing speed-up over Pillow, 1-4 MP photos", pillow_large / ours_large, TARGETS["preprocess_speedup"], unit="x")

    print()
    results["result_stores"] = result_stores(bins["results"])

    print(f"\ntargets ({cpu['model']}, {cores} cores):")
    def shown(value, target, ok):
        # Two decimals, or more where a miss would print as its target (2.996x as 3.00x).
        for digits in (2, 3, 4):
            text = f"{value:.{digits}f}"
            if ok or float(text) != target:
                break
        return text

    for what, value, target, ok, unit, higher in verdicts:
        print(f"  {'met   ' if ok else 'MISSED'} {what:58s} {shown(value, target, ok):>6}{unit} ({'>=' if higher else '<='} {target}{unit})")
    results["targets"] = [dict(what=w, value=v, target=t, met=ok) for w, v, t, ok, _, _ in verdicts]
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    plot(results)


def plot(results):
    """Each pipeline's throughput against its model's bound."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no plot)")
        return
    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.4), squeeze=False)
    for ax, (model, m) in zip(axes[0], models.items()):
        names = [k for k, v in m.items() if isinstance(v, dict) and "ratio_to_bound" in v and "one client" not in k]
        values = [m[k]["images_per_s"] for k in names]
        bars = ax.bar(range(len(names)), values, color="#4a7ab5")
        ax.axhline(m["bound_images_per_s"], color="#c0392b", linestyle="--", label=f"bound {m['bound_images_per_s']:.0f} img/s")
        for bar, k in zip(bars, names):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{m[k]['ratio_to_bound']:.2f}", ha="center", va="bottom")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("_", " ").replace(" (", "\n(").replace(", ", ",\n") for n in names], fontsize=7)
        ax.set_ylabel("images/s")
        ax.set_title(model)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['cpu']['model']}, {results['cpu']['cores']} cores", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
    fig.savefig(os.path.join(ROOT, "docs/throughput.png"), dpi=110)


if __name__ == "__main__":
    main()
