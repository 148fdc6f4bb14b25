#!/usr/bin/env python3
"""Kill/resume soak: interrupt train, finetune --lora and data build at random moments with
SIGKILL or SIGTERM, resume each until it finishes, and check that every run ends bit-identical
to its uninterrupted twin. Train and finetune also run on two processes (`--gpus 2`): the
signal then goes to the launcher (SIGTERM is passed on to the ranks; SIGKILL takes them down
with SIGTERM, on Linux), and a resume waits while the ranks still hold the run directory.

    cargo build --release
    python3 bench/soak.py --binary target/release/llmtool --interruptions 100
    python3 bench/soak.py --kinds "train --gpus 2,finetune --gpus 2" --interruptions 30

Needs only the Python standard library. Every run works in a temporary folder; nothing in the
repository is written. What must hold after the last resume:

* train / finetune: the final weights (model.safetensors, adapter_model.safetensors) are
  byte-identical to the twin's, and metrics.jsonl has the same records (timings aside);
* data build: every file of the dataset is byte-identical to the twin's, and no staging
  folder is left beside it.

Exits 1 on the first difference, printing it; prints the figures at the end.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KINDS = ("train", "finetune", "data build", "train --gpus 2", "finetune --gpus 2")
TINY_BASE = REPO / "tests" / "fixtures" / "tiny-llama"


def corpus(folder: Path, files: int) -> None:
    """Markdown notes with enough variety for a tokenizer and a few hundred windows."""
    folder.mkdir(parents=True)
    words = ("river hill stone lantern harbor meadow copper winter signal orchard "
             "thread compass ember valley quiet morning ledger").split()
    rng = random.Random(7)
    for i in range(files):
        lines = [f"# Note {i}", ""]
        for p in range(6):
            lines.append(" ".join(rng.choice(words) for _ in range(40)) + ".")
            lines.append("")
        lines.append(f"- item {i}\n- another item\n")
        (folder / f"note{i:04}.md").write_text("\n".join(lines))


def train_config(folder: Path, notes: Path, steps: int) -> Path:
    text = f"""model:
  hidden_size: 32
  num_hidden_layers: 2
  num_attention_heads: 4
  num_key_value_heads: 2
  intermediate_size: 64
  vocab_size: 384
  max_position_embeddings: 64
data:
  roots: [{notes}]
  val_fraction: 0.1
training:
  seq_len: 32
  batch_size: 4
  max_steps: {steps}
  warmup_steps: 5
  eval_every: 25
  eval_batches: 2
  save_every: 7
  log_every: 3
output:
  dir: {folder / 'run'}
"""
    path = folder / "train.yaml"
    path.write_text(text)
    return path


def finetune_config(folder: Path, notes: Path, steps: int) -> Path:
    text = f"""model:
  pretrained: {TINY_BASE}
data:
  roots: [{notes}]
  val_fraction: 0.1
training:
  seq_len: 32
  batch_size: 4
  max_steps: {steps}
  warmup_steps: 5
  lr: 0.01
  eval_every: 25
  eval_batches: 2
  save_every: 7
  log_every: 3
lora:
  r: 4
  alpha: 8
  dropout: 0.1
  target_modules: [q, v]
output:
  dir: {folder / 'run'}
"""
    path = folder / "finetune.yaml"
    path.write_text(text)
    return path


def run(args, check=True):
    done = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and done.returncode != 0:
        sys.exit(f"soak: {' '.join(map(str, args))} failed ({done.returncode}):\n{done.stderr}")
    return done


def metrics(run_dir: Path):
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("elapsed", None)
        record.pop("tokens_per_sec", None)
        records.append(record)
    return records


def dataset_files(folder: Path):
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(folder))] = path.read_bytes()
    return files


class Soak:
    def __init__(self, binary: Path, rng: random.Random):
        self.binary = binary
        self.rng = rng
        self.kills = {"SIGKILL": 0, "SIGTERM": 0}
        self.landed = 0  # interruptions that stopped a command before it finished

    def interrupted(self, first, resume, max_wait):
        """Runs `first`, then `resume` after every interruption, until one finishes. The first
        few attempts (2 to 8) are interrupted at a random moment up to `max_wait` seconds;
        the last one is left to finish."""
        attempt = first
        budget = self.rng.randint(2, 8)
        while True:
            child = subprocess.Popen(attempt, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
            try:
                timeout = self.rng.uniform(0.05, max_wait) if budget > 0 else None
                budget -= 1
                child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                name = self.rng.choice(["SIGKILL", "SIGTERM"])
                child.send_signal(getattr(signal, name))
                self.kills[name] += 1
            out, err = child.communicate()
            if child.returncode == 0:
                return out
            if child.returncode == 1 and "is in use by process" in err:
                # The ranks of a killed launcher are still saving their checkpoint.
                time.sleep(0.1)
                continue
            if child.returncode == 1 and "does not hold a run to resume" in err:
                # Killed before it recorded its config: the run starts again.
                attempt = first
                continue
            expected = {-signal.SIGKILL, 128 + signal.SIGTERM, -signal.SIGTERM}
            if child.returncode not in expected:
                sys.exit(f"soak: {' '.join(map(str, attempt))} exited {child.returncode}:\n{err}")
            self.landed += 1
            attempt = resume

    def training(self, kind: str, make_config, notes: Path, steps: int, max_wait: float):
        """`kind`: train or finetune (--lora), optionally followed by launcher flags."""
        with tempfile.TemporaryDirectory() as twin_dir, tempfile.TemporaryDirectory() as dir:
            twin_dir, dir = Path(twin_dir), Path(dir)
            name, *launch = kind.split()
            command = [name]
            extra = (["--lora"] if name == "finetune" else []) + launch
            twin = make_config(twin_dir, notes, steps)
            run([self.binary, *command, twin, *extra])
            config = make_config(dir, notes, steps)
            run_dir = dir / "run"
            first = [self.binary, *command, config, *extra]
            resume = [self.binary, *command, *extra, "--resume", run_dir]
            self.interrupted(first, resume, max_wait)
            artifact = ("model/model.safetensors" if name == "train"
                        else "adapter/adapter_model.safetensors")
            a = (twin_dir / "run" / artifact).read_bytes()
            b = (run_dir / artifact).read_bytes()
            if a != b:
                sys.exit(f"soak: {kind}: {artifact} differs from the uninterrupted run's")
            if metrics(twin_dir / "run") != metrics(run_dir):
                sys.exit(f"soak: {kind}: metrics.jsonl differs from the uninterrupted run's")

    def data_build(self, notes: Path, max_wait: float):
        with tempfile.TemporaryDirectory() as twin_dir, tempfile.TemporaryDirectory() as dir:
            twin_dir, dir = Path(twin_dir), Path(dir)
            twin = train_config(twin_dir, notes, 10)
            run([self.binary, "data", "build", twin])
            config = train_config(dir, notes, 10)
            build = [self.binary, "data", "build", config]
            self.interrupted(build, build, max_wait)
            want = dataset_files(twin_dir / "run" / "dataset")
            got = dataset_files(dir / "run" / "dataset")
            if want != got:
                differing = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
                sys.exit(f"soak: data build: {differing} differ from the uninterrupted build's")
            leftovers = [p.name for p in (dir / "run").iterdir() if p.name.startswith(".")]
            if leftovers:
                sys.exit(f"soak: data build left {leftovers}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "llmtool")
    parser.add_argument("--interruptions", type=int, default=100,
                        help="stop once this many interruptions landed (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help="comma list of what to interrupt (default: all): " + ", ".join(KINDS))
    args = parser.parse_args()
    if not args.binary.is_file():
        sys.exit(f"soak: {args.binary} not found: cargo build --release first, or pass --binary")
    rng = random.Random(args.seed)
    soak = Soak(args.binary.resolve(), rng)
    started = time.time()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        sys.exit(f"soak: unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    runs = {kind: 0 for kind in kinds}
    with tempfile.TemporaryDirectory() as scratch:
        small, large = Path(scratch) / "small", Path(scratch) / "large"
        corpus(small, 40)
        corpus(large, 3000)
        while soak.landed < args.interruptions:
            for kind in kinds:
                if kind == "data build":
                    soak.data_build(large, 1.0)
                else:
                    make = train_config if kind.startswith("train") else finetune_config
                    soak.training(kind, make, small, 150, 2.0)
                runs[kind] += 1
            print(f"soak: {soak.landed} interruptions so far ({soak.kills}), every run identical",
                  flush=True)
    print(json.dumps({
        "interruptions_landed": soak.landed,
        "signals_sent": soak.kills,
        "runs_per_kind": runs,
        "identical": True,
        "seconds": round(time.time() - started),
    }, indent=2))


if __name__ == "__main__":
    main()
