"""Benchmark: eager vs ``torch.compile`` for every model, with the graph counts that show no breaks.

For each model (default: every registered ``*-tiny`` model; any registered name works, e.g.
``clipseg-rd64`` for the full-size architecture with random weights -- no download), in a fresh
subprocess per model:

* ``torch._dynamo.explain`` of the inference pass (eval, no grad) and of the training step
  (the model's default task on a token batch, forward + loss): number of graphs and graph breaks
  (1 graph, 0 breaks = the whole pass is one graph);
* the compile time: the first call of each compiled pass (tracing, AOT autograd, the backend);
* the time per call of the eager pass and of the compiled one, best of ``--repeats`` interleaved
  calls (the minimum is the statistic least disturbed by other load), and their ratio
  ``compiled / eager``.

The tensor-only entry points are the ones the tests compile with ``fullgraph=True``: pre-tokenised
prompts (``model.tokenize``), and for text-free models their prepared training text
(``model.prepare_text``).

What the ratio means depends on the backend. ``aot_eager`` (the default, runnable anywhere) runs the
captured graphs with the eager kernels: it fuses nothing, so its ratio is the overhead of running
through the compiled wrapper (guards, AOT autograd's functionalised graphs), not a speed-up. The
point of running it on CPU is the graph count. ``--backend inductor`` generates fused kernels (C++
/ OpenMP on CPU, which needs a compiler; Triton on a GPU) -- that is where a speed-up comes from.

Usage::

    python benchmarks/compile.py [--models clipseg-tiny medclipseg-tiny ...] [--backend aot_eager]
        [--batch-size 2] [--image-size N] [--repeats 10] [--threads 2] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPTS = ["a small round lesion", "two polyps on the left", "an irregular dark mole", "nothing"]


# ---------------------------------------------------------------------------- one model
def _setup(args: argparse.Namespace):
    import torch

    import vlsegkit
    from vlsegkit.models.capabilities import SupportsTextFree

    torch.manual_seed(0)
    kwargs = {} if args.image_size is None else {"image_size": args.image_size}
    model = vlsegkit.create_model(args.model, **kwargs).to(args.device)
    g = torch.Generator().manual_seed(0)
    b = args.batch_size
    h, w = model.image_size
    images = torch.randn(b, 3, h, w, generator=g).to(args.device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
    if isinstance(model, SupportsTextFree):
        masks = (torch.rand(b, model.num_classes, h, w, generator=g) > 0.6).float()
        masks = masks.to(args.device)
        batch = {
            "image": images,
            "mask": masks,
            "prompt": model.prepare_text(images, prompts, masks),
        }

        def infer(m):
            return m(images).logits

        def strings(m):  # the training text from strings and masks: data-dependent steps
            return m(images, prompts, masks=masks, condition="mixture").logits
    else:
        masks = (torch.rand(b, 1, h, w, generator=g) > 0.6).float().to(args.device)
        ids, mask = model.tokenize(prompts)
        ids, mask = ids.to(args.device), mask.to(args.device)
        batch = {"image": images, "mask": masks, "input_ids": ids, "attention_mask": mask}

        def infer(m):
            return m(images, input_ids=ids, attention_mask=mask).logits

        def strings(m):  # tokenising strings is Python work: no graph holds it
            return m(images, prompts).logits

    task = model.default_task()

    def train(m):
        return task.training_step(m, batch)["loss"]

    return model, infer, train, strings


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _worker(args: argparse.Namespace) -> dict:
    import torch
    import torch._dynamo

    torch.set_num_threads(args.threads)
    model, infer, train, strings = _setup(args)
    row: dict = {"model": args.model, "backend": args.backend}
    with torch.no_grad():
        explanation = torch._dynamo.explain(strings)(model.eval())
    row["strings"] = {"graphs": explanation.graph_count, "breaks": explanation.graph_break_count}
    for mode, fn, train_mode in (("inference", infer, False), ("training", train, True)):
        model.train(train_mode)
        compiled = torch.compile(fn, backend=args.backend)

        def run(f, train_mode=train_mode):
            # training: forward + loss in the graph, then the backward graph; inference: no grad
            if not train_mode:
                with torch.no_grad():
                    return f(model)
            model.zero_grad(set_to_none=True)
            f(model).backward()

        torch._dynamo.reset()
        with torch.set_grad_enabled(train_mode):
            explanation = torch._dynamo.explain(fn)(model)
        torch._dynamo.reset()
        start = time.perf_counter()
        run(compiled)
        _sync(args.device)
        compile_s = time.perf_counter() - start
        run(fn)  # warm-up of the eager path
        times = {"eager": [], "compiled": []}
        for _ in range(args.repeats):  # interleaved: both see the same background load
            for name, f in (("eager", fn), ("compiled", compiled)):
                _sync(args.device)
                start = time.perf_counter()
                run(f)
                _sync(args.device)
                times[name].append(time.perf_counter() - start)
        row[mode] = {
            "graphs": explanation.graph_count,
            "breaks": explanation.graph_break_count,
            "break_reasons": [str(r.reason).splitlines()[0] for r in explanation.break_reasons],
            "compile_s": compile_s,
            "eager_ms": 1e3 * min(times["eager"]),
            "compiled_ms": 1e3 * min(times["compiled"]),
        }
    return row


# ---------------------------------------------------------------------------- driver
def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help="registry names (default: *-tiny)")
    p.add_argument("--backend", default="aot_eager", help="torch.compile backend")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--image-size", type=int, default=None, help="default: the model's own")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the rows as JSON too")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _forward_args(args: argparse.Namespace) -> list[str]:
    out = ["--backend", args.backend, "--batch-size", str(args.batch_size)]
    out += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    out += ["--device", args.device]
    if args.image_size is not None:
        out += ["--image-size", str(args.image_size)]
    return out


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        args.model = args.worker
        print(json.dumps(_worker(args)))
        return 0
    models = args.models
    if models is None:
        import vlsegkit

        models = vlsegkit.list_models("*-tiny")
    rows = []
    for name in models:  # a fresh process per model: no compile cache or thread pool is shared
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, *_forward_args(args)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"backend={args.backend} device={args.device} batch={args.batch_size} "
        f"threads={args.threads} repeats={args.repeats} (best of, interleaved)"
    )
    header = (
        f"{'model':<18} {'pass':<10} {'graphs':>6} {'breaks':>6} {'compile s':>9} "
        f"{'eager ms':>9} {'compiled ms':>11} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        for mode in ("inference", "training"):
            r = row[mode]
            ratio = r["compiled_ms"] / r["eager_ms"]
            print(
                f"{row['model']:<18} {mode:<10} {r['graphs']:>6} {r['breaks']:>6} "
                f"{r['compile_s']:>9.1f} {r['eager_ms']:>9.1f} {r['compiled_ms']:>11.1f} "
                f"{ratio:>6.2f}"
            )
            for reason in r["break_reasons"]:
                print(f"    break: {reason}")
    print("\nThe same inference pass from prompt strings (explain only):")
    for row in rows:
        r = row["strings"]
        print(f"{row['model']:<18} {r['graphs']} graphs, {r['breaks']} breaks")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
