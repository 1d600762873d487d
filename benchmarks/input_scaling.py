"""What each process reads, in units of its ideal share, at start-up, per epoch and on a resume.

Two measurements, both by ``rchar`` (bytes a process read, ``/proc/self/io``):

1. **The launcher, N real processes** (jax.distributed on localhost, one CPU device
   each), the tiny preset (batch 32) on an image folder of noise JPEGs: a fresh run of
   2 steps, then a resume 4 epochs in (step 4 x images / 32 + 1) for 2 more steps. Each process's
   bytes less those of the same runs on a folder of 8-pixel JPEGs (what the program
   reads whatever the data), in units of the folder's size.
2. **Simulated processes over a prepared TFDS dataset with many shards** and over the
   same folder: for each process in turn (in this process), the bytes its index scan,
   one epoch of its stream, and a resume 4.5 epochs in (first batch) read, in units of
   its ideal share (the data's size / N).
3. **Evaluation**, the same simulated processes at 1% labels: the bytes fine-tuning's
   stream reads in its first and later epochs, in units of the labelled records the
   process uses, and the online k-NN's support batches at the first and later
   evaluations, in units of the support images it embeds.

``python benchmarks/input_scaling.py [--processes 4 --images 1000 --size 320]``.
Prints tables and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def make_folder(root: str, images: int, size: int, classes: int = 10, seed: int = 0) -> int:
    """``root/train/<class>/*.jpg`` of noise JPEGs; returns their total bytes."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    total = 0
    for i in range(images):
        d = os.path.join(root, "train", f"class_{i % classes:02d}")
        os.makedirs(d, exist_ok=True)
        data = tf.io.encode_jpeg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), quality=90).numpy()
        with open(os.path.join(d, f"img_{i:05d}.jpg"), "wb") as f:
            f.write(data)
        total += len(data)
    return total


# ----------------------------------------------------------------------------- 1: the launcher


def worker_main(out: str, argv: list[str]) -> None:
    """One launcher process: its rchar goes to ``out`` when it exits (also on exit 75)."""
    atexit.register(lambda: open(out, "w").write(str(rchar())))
    sys.argv = ["semppl_jax.main", *argv]
    from semppl_jax import main

    main.run()


def launch(processes: int, folder: str, workdir: str, stop_after: int, outdir: str, tag: str) -> list[int]:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_DISABLE_MOST_OPTIMIZATIONS="true")
    args = ["--config=experiments/tiny.py", f"--config.dataset.name=folder:{folder}", f"--workdir={workdir}",
            "--config.training.num_steps=1000", "--config.training.log_every_steps=1000",
            "--config.training.checkpoint_every_minutes=600", "--config.training.checkpoint_every_steps=100000",
            f"--stop_after={stop_after}", f"--coordinator_address=localhost:{port}",
            f"--num_processes={processes}"]
    procs = []
    for i in range(processes):
        out = os.path.join(outdir, f"{tag}_{i}.rchar")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", out, "--", *args, f"--process_id={i}"],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a launcher process failed:\n" + "\n".join(log[-3000:] for log in logs))
    return [int(open(os.path.join(outdir, f"{tag}_{i}.rchar")).read()) for i in range(processes)]


def launcher_reads(processes: int, images: int, size: int, tmp: str) -> dict:
    result = {}
    for name, px in (("big", size), ("small", 8)):
        folder = os.path.join(tmp, f"folder_{name}")
        result[f"{name}_bytes"] = make_folder(folder, images, px)
        workdir = os.path.join(tmp, f"run_{name}")
        t = time.time()
        result[f"{name}_fresh"] = launch(processes, folder, workdir, 2, tmp, f"{name}_fresh")
        resume_at = 4 * (images // 32) + 1  # 4 epochs of the tiny preset's batch of 32, then one step
        launch(processes, folder, workdir, resume_at - 2, tmp, f"{name}_advance")
        result[f"{name}_resume"] = launch(processes, folder, workdir, 2, tmp, f"{name}_resume")
        print(f"  launcher runs on the {px}-px folder: {time.time() - t:.0f}s", flush=True)
    folder_bytes = result["big_bytes"]
    for phase in ("fresh", "resume"):
        result[f"{phase}_units"] = [(b - s) / folder_bytes for b, s in
                                    zip(result[f"big_{phase}"], result[f"small_{phase}"])]
    return result


# ----------------------------------------------------------------------------- 2: simulated processes


def make_tfds(data_dir: str, images: int, size: int, shards: int) -> tuple[object, int]:
    import tensorflow_datasets as tfds

    class NoiseImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(dict(
                image=tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                label=tfds.features.ClassLabel(num_classes=10), file_name=tfds.features.Text())))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(1)
            for i in range(images):
                yield i, dict(image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8), label=i % 10,
                              file_name=f"img_{i:05d}.JPEG")

    builder = NoiseImages(data_dir=data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=shards))
    import tensorflow as tf

    files = tf.io.gfile.glob(f"{builder.data_dir}/*train.tfrecord*")
    return builder, sum(tf.io.gfile.stat(f).length for f in files)


def simulated_reads(source, total_bytes: int, processes: int) -> list[dict]:
    """Per process: bytes of its index scan, one epoch, and a resume 4.5 epochs in."""
    from experiments import tiny
    from semppl_jax import input_pipeline, split_index

    config = tiny.get_config()
    ideal = total_bytes / processes
    labelled = np.zeros(source.num_ids, bool)
    labelled[::10] = True
    rows = []
    for p in range(processes):
        lo, hi = split_index.share_range(source.num_ids, p, processes)
        before = rchar()
        split_index.scan_share(source, lo, hi, validate=True)
        scan = rchar() - before
        local = config.training.batch_size // processes
        steps = (hi - lo) // local
        before = rchar()
        it = input_pipeline.train_dataset(source, labelled, config, local, 0, p, processes).as_numpy_iterator()
        for _ in range(steps):
            next(it)
        epoch = rchar() - before
        del it
        before = rchar()
        start = int(4.5 * steps)
        it = input_pipeline.train_dataset(source, labelled, config, local, 0, p, processes,
                                          start_step=start).as_numpy_iterator()
        next(it)
        resume = rchar() - before
        del it
        rows.append(dict(process=p, startup=scan / ideal, epoch=epoch / ideal, resume=resume / ideal))
    return rows


# ----------------------------------------------------------------------------- 3: evaluation


def record_sizes(source) -> np.ndarray:
    """Each id's encoded image bytes (read once, before any measurement)."""
    sizes = np.zeros(source.num_ids, np.int64)
    for ex in source.records().as_numpy_iterator():
        sizes[ex["image_id"]] = len(ex["image"])
    return sizes


def evaluation_reads(source, processes: int, fraction: float, epochs: int = 5) -> list[dict]:
    """Per process, at ``fraction`` labels: the bytes fine-tuning's stream (and linear's on the
    labelled subset) reads in its first epoch and on average in the later ones, and the bytes
    the online k-NN's support batches read at the first and the later evaluations, each in
    units of the labelled records (support images) that process uses."""
    from experiments import tiny
    from semppl_jax import input_pipeline, label_subsets, split_index

    config = tiny.get_config()
    sizes = record_sizes(source)
    labelled = label_subsets.stratified_subset(source.labels, fraction, 0)
    support = np.flatnonzero(labelled)
    rows = []
    for p in range(processes):
        lo, hi = split_index.share_range(source.num_ids, p, processes)
        mine = support[(support >= lo) & (support < hi)]
        local, per_epoch = 1, len(mine)  # a batch an image: an epoch is exactly the labelled images
        it = input_pipeline.train_dataset(source, labelled, config, local, 0, p, processes,
                                          only_labelled=True).as_numpy_iterator()
        reads = []
        for _ in range(epochs):
            before = rchar()
            for _ in range(per_epoch):
                next(it)
            reads.append(rchar() - before)
        del it
        part = np.array_split(support, processes)[p]
        ds = input_pipeline.eval_dataset(source, config, local, p, processes, ids=support, keep_crops=True)
        knn = []
        for _ in range(epochs):
            before = rchar()
            for _ in ds.as_numpy_iterator():
                pass
            knn.append(rchar() - before)
        lab_bytes, support_bytes = sizes[mine].sum(), sizes[part].sum()
        rows.append(dict(process=p, labelled=int(len(mine)), finetune_first=reads[0] / lab_bytes,
                         finetune_later=float(np.mean(reads[1:])) / lab_bytes, support=int(len(part)),
                         knn_first=knn[0] / support_bytes, knn_later=float(np.mean(knn[1:])) / support_bytes))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--skip_launcher", action="store_true")
    parser.add_argument("--eval_fraction", type=float, default=0.01)
    parser.add_argument("--out", default="input_scaling.json")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from semppl_jax import datasets, sources, split_index

    report: dict = dict(processes=args.processes, images=args.images, size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_launcher:
            print(f"1. the launcher, {args.processes} real processes, tiny preset (batch 32), "
                  f"{args.images} noise JPEGs of {args.size} px", flush=True)
            report["launcher"] = r = launcher_reads(args.processes, args.images, args.size, tmp)
            print(f"   folder: {r['big_bytes'] / 1e6:.1f} MB. Bytes read less the 8-px runs', in folder sizes:")
            resume_at = 4 * (args.images // 32) + 1
            print(f"   {'process':>8s} {'fresh, 2 steps':>15s} {f'resume at {resume_at}, 2 steps':>24s}")
            for i, (f, s) in enumerate(zip(r["fresh_units"], r["resume_units"])):
                print(f"   {i:8d} {f:15.3f} {s:24.3f}")
        print(f"2. simulated processes ({args.processes}), in units of the ideal share (data / processes)",
              flush=True)
        builder, tfds_bytes = make_tfds(os.path.join(tmp, "tfds"), args.images, args.size, args.shards)
        folder = os.path.join(tmp, "folder_big")
        folder_bytes = report.get("launcher", {}).get("big_bytes") or make_folder(folder, args.images, args.size)
        runs = {f"prepared TFDS, {args.shards} shards": (split_index.index_source(sources.tfds_source(
                    "noise_images", "train", os.path.join(tmp, "tfds")), False), tfds_bytes),
                "image folder": (datasets.load_source(f"folder:{folder}", "train"), folder_bytes)}
        report["simulated"] = {}
        print(f"   {'source':28s} {'process':>7s} {'start-up':>9s} {'epoch':>7s} {'resume 4.5 epochs in':>21s}")
        for name, (source, size) in runs.items():
            rows = simulated_reads(source, size, args.processes)
            report["simulated"][name] = rows
            for r in rows:
                print(f"   {name:28s} {r['process']:7d} {r['startup']:9.2f} {r['epoch']:7.2f} {r['resume']:21.2f}")
        print(f"3. evaluation at {args.eval_fraction:.0%} labels, simulated processes ({args.processes}): bytes "
              f"read in units of the labelled records (fine-tune) or support images (online k-NN) each uses",
              flush=True)
        report["evaluation"] = {}
        print(f"   {'source':28s} {'process':>7s} {'labelled':>8s} {'fine-tune: epoch 1':>19s} {'later':>6s} "
              f"{'k-NN: eval 1':>13s} {'later':>6s}")
        for name, (source, _) in runs.items():
            if source.labels is None:  # TFDS: labels from the index
                source = split_index.index_source(source, False)
            rows = evaluation_reads(source, args.processes, args.eval_fraction)
            report["evaluation"][name] = rows
            for r in rows:
                print(f"   {name:28s} {r['process']:7d} {r['labelled']:8d} {r['finetune_first']:19.2f} "
                      f"{r['finetune_later']:6.2f} {r['knn_first']:13.2f} {r['knn_later']:6.2f}")
        del builder
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[4:])
    else:
        main()
