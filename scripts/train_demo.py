#!/usr/bin/env python
"""Train the bundled demo omni model on the synthetic tasks of ``make_demo_data.py``.

    python scripts/train_demo.py                     # writes omniquant/demo/model/
    python scripts/train_demo.py --steps 200 --out /tmp/demo-model   # a quick try

What it does, in order (seeded; 2 CPU threads by default):
    1. Generates the training split (``make_demo_data.py --split train``) into a
       temporary directory (``--train-dir`` keeps it), plus a few held-out training-
       distribution samples per task for validation. The shipped calibration and
       evaluation splits are never trained on nor used for model selection.
    2. Trains a BPE tokenizer on the tasks' text (prompts, answers, the processor's video
       frame labels) and builds the demo model (``omniquant.demo.build``) in float32.
    3. Processes every sample with ``OmniProcessor.from_pretrained`` of the checkpoint
       being trained: exactly the processing evaluation uses.
    4. Trains with AdamW on the answer span: the loss is the cross-entropy of
       ``answer + </s>`` right after the processed prompt, so greedy decoding emits the
       answer and stops. Batches hold samples of one task (equal media shapes), right-
       padded (the backbone is causal, so padding after the answer changes nothing);
       the forward is the adapter's, as in calibration and evaluation.
    5. Saves BF16 weights in the hub layout (``save_pretrained``) with the tokenizer and
       ``preprocessor_config.json``, reloads them with ``omniquant.models.load_model``
       and scores the shipped evaluation split (``tasks/omni-demo``) with omniquant's
       evaluator (``omniquant.evaluate``); writes ``accuracy.json`` in the model
       directory's parent (per-task accuracy, every prediction) and fails if a task is
       below ``--min-accuracy``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "omniquant" / "demo" / "model"
#: Training samples per task: the tasks the model overfits at a few hundred samples
#: (counting, reading, video, speech) get more; counting sequences have 72 distinct ones.
TRAIN_SAMPLES = {
    "shape_colour": 600, "shape_count": 4800, "read_digit": 2400, "motion_direction": 2400,
    "is_moving": 2400, "pitch": 600, "beep_count": 800, "spoken_digit": 2400, "next_number": 300,
}  # fmt: skip


def load_data_script():
    spec = importlib.util.spec_from_file_location("make_demo_data", Path(__file__).with_name("make_demo_data.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_demo_data", module)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ data


def tokenizer_corpus(lines: list[dict], data) -> list[str]:
    """Text the BPE merges are learnt from: prompts, answers and video frame labels."""
    from omniquant.data.processing import ProcessorSettings, video_placeholder

    frames = data.VIDEO_FRAMES
    labels = video_placeholder(frames, 0, ProcessorSettings(), float(data.VIDEO_FPS), list(range(frames)))
    labels = labels.replace("<img></img>", "")
    texts = sorted({line["prompt"].replace("<image>", "").replace("<video>", "").replace("<audio>", "")
                    for line in lines})  # fmt: skip
    answers = sorted({line["answer"] for line in lines} | {str(n) for n in range(40)})
    return [labels] * 50 + texts * 20 + answers * 20 + [" ".join(answers)] * 20


def decode_media(root: Path, line: dict) -> dict:
    """The line's media decoded with omniquant's readers, as processor keyword arguments
    (what the processor itself would read from the files; decoded once, kept in memory)."""
    from omniquant.data import media

    if "image" in line:
        return {"images": [media.read_image(root / line["image"])]}
    if "video" in line:
        return {"video": media.read_video(root / line["video"])}
    if "audio" in line:
        return {"audio": [media.read_audio(root / line["audio"])]}
    return {}


def process_line(proc, line: dict, decoded: dict):
    """A task-format line (``tasks.jsonl``) and its decoded media -> ``Sample``, through
    the prompt form of the processor, with the task name in ``meta``."""
    sample = proc(line["prompt"], **decoded, answer=line["answer"], sample_id=line["id"])
    sample.meta.update(task=line["task"], answer=line["answer"])
    return sample


def collate(samples: list, eos_id: int, pad_id: int):
    """Right-padded batch of same-task samples and its labels (-100 outside answer+eos)."""
    import torch

    from omniquant.data.batch import Sample

    seqs = [torch.cat([s.input_ids[0], s.answer_ids[0], torch.tensor([eos_id])]) for s in samples]
    length = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    for row, (sample, seq) in enumerate(zip(samples, seqs)):
        ids[row, : len(seq)] = seq
        start = sample.input_ids.shape[1]
        labels[row, start : len(seq)] = seq[start:]

    def cat(name):
        parts = [getattr(s, name) for s in samples]
        if parts[0] is None:
            return None
        if name.startswith("input_features") and len({p.shape for p in parts}) != 1:
            raise ValueError("a batch needs audio of one length (batch samples of one task)")
        return torch.cat(parts)

    batch = Sample(
        id="batch",
        input_ids=ids,
        pixel_values=cat("pixel_values"),
        image_grid_hw=cat("image_grid_hw"),
        pixel_values_videos=cat("pixel_values_videos"),
        input_features=cat("input_features"),
        input_features_mask=cat("input_features_mask"),
    )
    return batch, labels


def answer_loss(logits, labels):
    """Mean cross-entropy of the answer tokens, and per-row all-correct flags."""
    import torch

    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100)
    mask = targets != -100
    hits = (shifted.argmax(-1) == targets) | ~mask
    return loss, hits.all(-1)


# ------------------------------------------------------------------------------ evaluation


def evaluate_split(model_dir: Path, tasks_dir: Path, ids: set[str] | None = None) -> dict:
    """Load ``model_dir`` with ``omniquant.models.load_model`` (BF16) and score the task set
    in ``tasks_dir`` with omniquant's evaluator (greedy answers for ``exact_match``,
    choice likelihood for ``multiple_choice``).

    Returns:
        ``{"per_task": {task: accuracy}, "predictions": {id: text}, "scores": {id: score},
        "eval_seconds": s}``.
    """
    from omniquant.data.processing import OmniProcessor
    from omniquant.evaluate import evaluate_model, prepare_task_items, validate_task_set
    from omniquant.models import load_model

    loaded = load_model(model_dir)
    entries = [e for e in validate_task_set(tasks_dir) if ids is None or e.id in ids]
    items = prepare_task_items(OmniProcessor.from_pretrained(model_dir), entries)
    evaluation = evaluate_model(loaded, items)
    scores: dict[str, list[float]] = defaultdict(list)
    for result in evaluation.samples:
        scores[result.task].append(result.score)
    return {
        "per_task": {task: sum(v) / len(v) for task, v in sorted(scores.items())},
        "predictions": {r.id: r.prediction for r in evaluation.samples},
        "scores": {r.id: r.score for r in evaluation.samples},
        "eval_seconds": round(evaluation.seconds, 1),
    }


# ------------------------------------------------------------------------------ training


def save_checkpoint(model, tokenizer, out: Path) -> None:
    """BF16 hub-layout checkpoint + tokenizer + preprocessor config (as ``make_tiny``)."""
    import copy

    import torch

    from omniquant.demo.tiny import _write_preprocessor_config

    if out.exists():
        shutil.rmtree(out)
    bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    bf16.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_preprocessor_config(out, bf16.config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=16)
    # Above ~4e-4 the model learns the answer priors by switching off its media inputs
    # and does not recover within the budget; 2.5e-4 learns every task.
    parser.add_argument("--lr", type=float, default=2.5e-4)
    parser.add_argument("--per-task", type=int, help="training samples of every task (default: TRAIN_SAMPLES)")
    parser.add_argument("--samples", action="append", default=[], metavar="TASK=N",
                        help="training samples of one task (repeatable; overrides --per-task)")  # fmt: skip
    parser.add_argument("--val-per-task", type=int, default=24, help="held-out training-distribution samples")
    parser.add_argument("--train-dir", type=Path,
                        help="keep the generated training split (and a resumable state) here; "
                             "rerunning the same command resumes an interrupted run")  # fmt: skip
    parser.add_argument("--tasks-dir", type=Path, default=REPO / "tasks" / "omni-demo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=200)
    parser.add_argument("--val-every", type=int, default=1000)
    parser.add_argument("--save-every", type=int, default=500, help="steps between resumable states")
    parser.add_argument("--min-accuracy", type=float, default=0.9)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    data = load_data_script()
    t_start = time.time()

    from omniquant.data.processing import OmniProcessor
    from omniquant.demo.build import build_demo_model, build_demo_tokenizer
    from omniquant.demo.tiny import _write_preprocessor_config
    from omniquant.models.base import adapter_for

    tmp = Path(tempfile.mkdtemp(prefix="omni-demo-train-"))
    train_dir = args.train_dir or tmp / "train"
    overrides = {}
    for item in args.samples:
        task, _, count = item.partition("=")
        if task not in data.TASKS or not count.isdigit():
            parser.error(f"--samples {item!r}: use TASK=N with TASK one of {', '.join(data.TASKS)}")
        overrides[task] = int(count)
    sizes = {task: overrides.get(task, args.per_task or TRAIN_SAMPLES[task]) + args.val_per_task
             for task in data.TASKS}  # fmt: skip
    lines = []
    for task, size in sizes.items():  # one directory per task: sizes differ
        task_dir = train_dir / task
        if not (task_dir / "tasks.jsonl").is_file() or len(data.read_split(task_dir)) != size:
            data.generate_split(task_dir, "train", size, seed=args.seed, tasks=[task], force=True)
        lines += [(task_dir, line) for line in data.read_split(task_dir)]
    print(f"[data] {len(lines)} training-split samples in {train_dir} ({time.time() - t_start:.0f}s)", flush=True)

    tokenizer = build_demo_tokenizer(tokenizer_corpus([line for _, line in lines], data))
    model = build_demo_model(tokenizer, seed=args.seed)
    proc_dir = tmp / "processor"  # config + tokenizer: what OmniProcessor.from_pretrained reads
    proc_dir.mkdir()
    model.config.save_pretrained(proc_dir)
    tokenizer.save_pretrained(proc_dir)
    _write_preprocessor_config(proc_dir, model.config)
    proc = OmniProcessor.from_pretrained(proc_dir)
    adapter = adapter_for(proc_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[model] {n_params / 1e6:.2f} M parameters, vocab {len(tokenizer)}", flush=True)

    # Training samples keep their decoded media and are processed per batch (cheap);
    # validation samples are processed once.
    train, val = defaultdict(list), defaultdict(list)
    for task_dir, line in lines:
        decoded = decode_media(task_dir, line)
        if int(line["id"].rsplit("-", 1)[1]) < sizes[line["task"]] - args.val_per_task:
            train[line["task"]].append((line, decoded))
        else:
            val[line["task"]].append(process_line(proc, line, decoded))
    tasks = sorted(train)
    print(f"[data] decoded in {time.time() - t_start:.0f}s", flush=True)
    for task in tasks:
        first = val[task][0]
        print(f"  {task}: {len(train[task])} train, {len(val[task])} val; {first.input_ids.shape[1]} prompt "
              f"tokens {first.meta['num_tokens']}, answer {first.answer_ids.shape[1]} token(s)", flush=True)  # fmt: skip

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    def validate() -> dict[str, float]:
        model.eval()
        acc = {}
        with torch.no_grad():
            for task in tasks:
                hits = []
                for k in range(0, len(val[task]), args.batch):
                    batch, labels = collate(val[task][k : k + args.batch], eos, pad)
                    _, ok = answer_loss(adapter.forward(model, batch).logits, labels)
                    hits.extend(ok.tolist())
                acc[task] = sum(hits) / max(1, len(hits))
        train_mode()
        return acc

    def train_mode() -> None:
        # Parakeet's BatchNorm stays in eval mode: it is then the same fixed affine map in
        # training and at inference (batch statistics would mix the tasks' audio).
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()

    rng = random.Random(args.seed)
    order = {task: [] for task in tasks}
    running: dict[str, float] = {}
    first_step, seconds_before = 0, 0.0
    # A resumable state every --save-every steps: the machines are shared and a long run
    # can be killed. Resuming restores model, optimizer, sampler and RNG state exactly.
    state_path = train_dir / "train_state.pt"
    run_key = {"seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr, "sizes": sizes}
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["run_key"] == run_key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            rng.setstate(state["rng"])
            order, running = state["order"], state["running"]
            first_step, seconds_before = state["step"], state["seconds"]
            print(f"[resume] from step {first_step} ({state_path})", flush=True)
    train_mode()
    t_train = time.time() - seconds_before
    for step in range(first_step, args.steps):
        # Even steps go round the tasks; odd steps pick a task in proportion to its
        # running loss, so the hard tasks get the spare steps.
        if step % 2 == 0 or len(running) < len(tasks):
            task = tasks[(step // 2) % len(tasks)]
        else:
            task = rng.choices(tasks, weights=[running[t] + 0.02 for t in tasks])[0]
        if len(order[task]) < args.batch:  # epoch-wise shuffling per task
            fresh = list(range(len(train[task])))
            rng.shuffle(fresh)
            order[task] += fresh
        picked = [process_line(proc, *train[task][order[task].pop()]) for _ in range(args.batch)]
        batch, labels = collate(picked, eos, pad)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss, _ = answer_loss(adapter.forward(model, batch).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running[task] = 0.8 * running[task] + 0.2 * loss.item() if task in running else loss.item()
        if (step + 1) % args.log_every == 0:
            per = " ".join(f"{t}={running[t]:.3f}" for t in tasks if t in running)
            print(f"[train] step {step + 1}/{args.steps} lr {lr_at(step):.2e} "
                  f"{time.time() - t_train:.0f}s | {per}", flush=True)  # fmt: skip
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            acc = validate()
            print(f"[val] step {step + 1}: " + " ".join(f"{t}={a:.2f}" for t, a in acc.items()), flush=True)
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            state = {"run_key": run_key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "rng": rng.getstate(), "order": order, "running": running, "step": step + 1,
                     "seconds": time.time() - t_train}  # fmt: skip
            torch.save(state, state_path.with_suffix(".tmp"))
            state_path.with_suffix(".tmp").replace(state_path)
    train_seconds = time.time() - t_train
    state_path.unlink(missing_ok=True)

    save_checkpoint(model, tokenizer, args.out)
    print(f"[save] BF16 checkpoint in {args.out}", flush=True)
    result = evaluate_split(args.out, args.tasks_dir)
    record = {
        "command": "python scripts/train_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "train_seconds": round(train_seconds),
        "total_seconds": round(time.time() - t_start),
        "threads": args.threads,
        "lr": args.lr,
        "train_samples": {task: size - args.val_per_task for task, size in sizes.items()},
        "eval_set": str(args.tasks_dir.relative_to(REPO)) if args.tasks_dir.is_relative_to(REPO) else str(args.tasks_dir),
        **result,
    }
    (args.out.parent / "accuracy.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print("[eval] BF16 per-task accuracy: " + " ".join(f"{t}={a:.3f}" for t, a in sorted(result["per_task"].items())), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    low = {t: a for t, a in result["per_task"].items() if a < args.min_accuracy}
    if low:
        sys.exit(f"train_demo: tasks below {args.min_accuracy:.0%}: {low}")


if __name__ == "__main__":
    main()
