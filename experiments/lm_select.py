"""Language-model data selection, small: MGD vs LESS, DSIR, perplexity, embedding, random.

Contract: one CPU thread (``torch.set_num_threads(1)``), CPython 3.11's standard library as
the text source (no download), about 10-15 minutes at the default size. It runs every method
of :mod:`mgd.apps.lm_select` at each budget, retrains each chosen subset from the same
pretrained GPT-2 on fresh evaluation seeds (full fine-tuning at every budget, LoRA at the
first), and writes

* ``docs/lm_select.json``: the whole report (config, pool fingerprint, selections'
  composition and cost, per-seed numbers, summaries, paired differences);
* the generated part of ``docs/lm_select.md`` (between ``<!-- results:begin -->`` and
  ``<!-- results:end -->``; the hand-written rest of the file is kept).

Both are written atomically. Progress goes to stderr. The run directory (default
``runs/lm_select``) caches the pretrained weights, the time of one fine-tuning run, each
method's selections and each evaluation, so an interrupted run resumes where it stopped; a
run directory made with other settings is refused (``--fresh`` starts over).

Run::

    python experiments/lm_select.py                     # the default comparison
    python experiments/lm_select.py --quick --run-dir /tmp/lm_quick --out /tmp/lm_quick.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mgd.apps import lm_select as lm
from mgd.evaluation import mean_ci
from mgd.io import atomic_write_bytes, write_json

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
#: The order of the tables.
METHODS = ("random", "dsir", "perplexity", "embedding", "less", "mgd", "full", "oracle")
CRAFTING_SEEDS = (0, 1, 2, 3)
EVAL_SEED_BASE = 100

_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def settings(args) -> dict:
    if args.quick:  # a smoke test of the whole pipeline (seconds), not a result
        recipe = lm.PoolRecipe(pool_size=80, target_fraction=0.15, n_val=8, n_test=16, n_general=64, doc_chars=32)
        model = lm.ModelConfig(width=16, layers=1, heads=2, context=32, pretrain_steps=10, pretrain_batch=8)
        finetune = lm.FineTune(steps=6, batch_size=8)
        mgd_settings = lm.MGDSettings(meta_steps=2)
        less_dim, seeds = 64, 2
    else:
        recipe = lm.PoolRecipe(pool_size=args.pool, target_fraction=0.15)
        model = lm.ModelConfig(pretrain_steps=400)
        finetune = lm.FineTune(steps=args.steps)
        mgd_settings = lm.MGDSettings(meta_steps=args.meta_steps)
        less_dim, seeds = 1024, args.eval_seeds
    return {"recipe": recipe, "model": model, "finetune": finetune, "mgd": mgd_settings,
            "mgd_lora": lm.MGDSettings(**{**mgd_settings.to_dict(), "regime": "lora"}),
            "less_dim": less_dim, "budgets": list(args.budgets),
            "eval_seeds": [EVAL_SEED_BASE + i for i in range(seeds)], "crafting_seeds": list(CRAFTING_SEEDS),
            "lora": not args.no_lora}


def config_dict(s: dict) -> dict:
    return {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in s.items()}


# ----------------------------------------------------------------------------- run directory


class RunDir:
    def __init__(self, path: Path, config: dict, fresh: bool):
        self.path = path
        if fresh and path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        saved = path / "config.json"
        canonical = json.loads(json.dumps(config))
        if saved.is_file():
            old = json.loads(saved.read_text())
            if old != canonical:
                diff = sorted(k for k in set(old) | set(canonical) if old.get(k) != canonical.get(k))
                raise SystemExit(f"{path} was made with other settings ({', '.join(diff)}); "
                                 "pass --fresh or another --run-dir")
        else:
            write_json(saved, canonical)

    def load(self, name: str):
        p = self.path / name
        return json.loads(p.read_text()) if p.is_file() else None

    def save(self, name: str, obj) -> None:
        write_json(self.path / name, obj)


# ----------------------------------------------------------------------------- phases


def build_context(s: dict, run_dir: RunDir) -> lm.LMContext:
    pool = lm.build_pool(s["recipe"])
    fp = run_dir.load("pool.json")
    if fp is not None and fp["fingerprint"] != pool.fingerprint():
        raise SystemExit("the pool differs from the one this run directory was made with (another Python "
                         "version?); pass --fresh")
    run_dir.save("pool.json", {"fingerprint": pool.fingerprint(), "composition": pool.composition(range(len(pool.docs)))})
    weights = run_dir.path / "pretrained.pt"
    if weights.is_file():
        ctx = lm.make_context(pool, s["model"], s["finetune"], pretrained=torch.load(weights, weights_only=True))
        meta = run_dir.load("pretrain.json")
        ctx.pretrain_seconds, ctx.pretrain_losses = meta["seconds"], meta["losses"]
        log(f"pretrained weights from {weights}")
    else:
        log(f"pretraining on {len(pool.general)} general documents ({s['model'].pretrain_steps} steps)")
        ctx = lm.make_context(pool, s["model"], s["finetune"])
        import io

        buffer = io.BytesIO()
        torch.save(ctx.pretrained, buffer)
        atomic_write_bytes(weights, buffer.getvalue())
        run_dir.save("pretrain.json", {"seconds": ctx.pretrain_seconds, "losses": ctx.pretrain_losses})
    timing = run_dir.load("timing.json")
    if timing is None:
        timing = {"run_seconds": lm.measure_run_seconds(ctx, regime="full"),
                  "lora_run_seconds": lm.measure_run_seconds(ctx, regime="lora")}
        run_dir.save("timing.json", timing)
    ctx.run_seconds = timing["run_seconds"]
    log(f"pool {ctx.n} documents, {len(pool.val)} val, {len(pool.test)} test; one fine-tuning run "
        f"{ctx.run_seconds:.2f}s (LoRA {timing['lora_run_seconds']:.2f}s); pretraining took {ctx.pretrain_seconds:.1f}s")
    return ctx


def selections(ctx: lm.LMContext, s: dict, run_dir: RunDir) -> dict[str, dict[str, lm.Selection]]:
    """``{method: {str(budget): Selection}}``, computed once per method for all budgets."""
    budgets = s["budgets"]
    ks = [ctx.k_of(b) for b in budgets]
    seed = s["crafting_seeds"][0]
    makers = {
        "random": lambda: [lm.select_random(ctx, k, seed=seed) for k in ks],
        "dsir": lambda: lm.select_dsir(ctx, ks, seed=seed),
        "perplexity": lambda: lm.select_perplexity(ctx, ks, seed=seed),
        "embedding": lambda: lm.select_embedding(ctx, ks),
        "less": lambda: lm.select_less(ctx, ks, seed=seed, dim=s["less_dim"]),
        "mgd": lambda: lm.mgd_select(ctx, lm.mgd_trajectory(ctx, s["mgd"], seeds=s["crafting_seeds"], progress=log),
                                     ks, seed=seed),
        "full": lambda: [lm.select_full(ctx) for _ in ks],
        "oracle": lambda: [lm.select_oracle(ctx, k, seed=seed) for k in ks],
    }
    if s["lora"]:
        def mgd_lora():
            sel = lm.mgd_select(ctx, lm.mgd_trajectory(ctx, s["mgd_lora"], seeds=s["crafting_seeds"], progress=log),
                                ks[:1], regime="lora", seed=seed)
            sel[0].name = "mgd-lora"
            return sel
        makers["mgd-lora"] = mgd_lora
    out = {}
    for name, make in makers.items():
        saved = run_dir.load(f"selections/{name}.json")
        if saved is None:
            log(f"selecting: {name}")
            started = time.perf_counter()
            chosen = make()
            run_dir.save(f"selections/{name}.json",
                         {str(b): c.to_dict() for b, c in zip(budgets, chosen)})
            log(f"  {name}: {time.perf_counter() - started:.1f}s")
            saved = run_dir.load(f"selections/{name}.json")
        out[name] = {b: lm.Selection.from_dict(d) for b, d in saved.items()}
    return out


def evaluations(ctx: lm.LMContext, s: dict, chosen: dict, run_dir: RunDir) -> dict:
    """``{regime: {budget: {method: [per-seed dict]}}}``; each (cell, seed) cached on disk."""
    cells = [("full", str(b)) for b in s["budgets"]]
    if s["lora"]:
        cells.append(("lora", str(s["budgets"][0])))
    out: dict = {}
    for regime, budget in cells:
        names = [m for m in METHODS if budget in chosen[m]]
        if regime == "lora":
            names.insert(names.index("mgd") + 1, "mgd-lora")
        for name in names:
            if budget == str(s["budgets"][0]) or name != "full":
                key = f"evals/{regime}-{budget}-{name}.json"
            else:  # the full pool is the same at every budget
                key = f"evals/{regime}-{s['budgets'][0]}-{name}.json"
            done = {r["seed"]: r for r in (run_dir.load(key) or [])}
            for seed in s["eval_seeds"]:
                if seed not in done:
                    done[seed] = lm.evaluate_subset(ctx, chosen[name][budget].indices, regime=regime, seed=seed)
                    run_dir.save(key, [done[x] for x in sorted(done)])
            out.setdefault(regime, {}).setdefault(budget, {})[name] = [done[x] for x in s["eval_seeds"]]
            log(f"evaluated {regime} budget {budget} {name}: test loss "
                f"{np.mean([r['test_loss'] for r in out[regime][budget][name]]):.4f}")
    return out


# ----------------------------------------------------------------------------- report


def summarise(s: dict, ctx: lm.LMContext, chosen: dict, evals: dict, seconds: float) -> dict:
    tables = {}
    for regime, by_budget in evals.items():
        for budget, by_method in by_budget.items():
            rows = {}
            for name, per_seed in by_method.items():
                sel = chosen[name][budget]
                rows[name] = {
                    "kind": sel.kind, "train_size": len(sel.indices),
                    "target_share": sel.info["composition"].get(ctx.pool.target_source, 0) / len(sel.indices),
                    "composition": sel.info["composition"],
                    "test_loss": mean_ci([r["test_loss"] for r in per_seed]),
                    "test_accuracy": mean_ci([r["test_accuracy"] for r in per_seed]),
                    "val_loss": mean_ci([r["val_loss"] for r in per_seed]),
                    "cost": {"seconds": sel.seconds, "training_runs": sel.runs},
                    "info": {k: v for k, v in sel.info.items() if k != "composition"},
                    "per_seed": per_seed,
                }
            mgd_name = "mgd"
            for name, row in rows.items():
                if name != mgd_name:
                    row["mgd_minus_this"] = {
                        "test_loss": lm.paired_difference(by_method[mgd_name], by_method[name], "test_loss"),
                        "test_accuracy": lm.paired_difference(by_method[mgd_name], by_method[name], "test_accuracy"),
                    }
            tables[f"{regime}/{budget}"] = rows
    return {
        "config": config_dict(s), "pool_fingerprint": ctx.pool.fingerprint(),
        "pool_composition": ctx.pool.composition(range(ctx.n)), "python": sys.version.split()[0],
        "torch": torch.__version__, "run_seconds": ctx.run_seconds, "pretrain_seconds": ctx.pretrain_seconds,
        "pretrain_final_loss": ctx.pretrain_losses[-1] if ctx.pretrain_losses else None,
        "invocation_seconds": seconds, "compute_seconds": compute_seconds(ctx, chosen, evals), "tables": tables,
    }


def compute_seconds(ctx: lm.LMContext, chosen: dict, evals: dict) -> float:
    """Seconds of computation behind the report, cached phases included: pretraining, each
    method's selections (a shared scoring counted once: the largest over budgets), every
    evaluation run. (A resumed invocation's own wall time is reported separately.)"""
    selecting = sum(max(sel.seconds for sel in by_budget.values()) for by_budget in chosen.values())
    evaluating = sum(r["seconds"] for cells in evals.values() for rows in cells.values()
                     for per_seed in rows.values() for r in per_seed)
    # the two budgets' MGD/perplexity iterate choices differ; the max undercounts them by a few runs
    return ctx.pretrain_seconds + selecting + evaluating


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [BEGIN, "",
             f"Generated by `python experiments/lm_select.py` (Python {report['python']}, torch {report['torch']}, "
             f"1 CPU thread; {report['compute_seconds'] / 60:.1f} min of computation behind these numbers, "
             f"this invocation {report['invocation_seconds'] / 60:.1f} min). Pool fingerprint "
             f"`{report['pool_fingerprint'][:16]}`. One fine-tuning run ({c['finetune']['steps']} steps of "
             f"{c['finetune']['batch_size']}) takes {report['run_seconds']:.2f} s: the unit of the cost column. "
             f"Evaluation seeds {c['eval_seeds']}; crafting seeds {c['crafting_seeds']}.", ""]
    for key, rows in report["tables"].items():
        regime, budget = key.split("/")
        k = next(iter(r["train_size"] for n, r in rows.items() if n not in ("full",)))
        lines += [f"### {'Full fine-tuning' if regime == 'full' else 'LoRA fine-tuning'}, budget {float(budget):.0%} "
                  f"(k = {k})", "",
                  "Target test loss (nats per character) and next-character accuracy, mean ± 95% CI over the "
                  "evaluation seeds; Δ = MGD minus the row, paired by seed (negative Δ loss: MGD better).", "",
                  "| method | kind | docs | target share | test loss | test acc (%) | Δ loss (MGD − row) "
                  "| Δ acc (pts) | cost (runs / s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            d = r.get("mgd_minus_this")
            dl = f"{d['test_loss']['mean']:+.4f} ± {d['test_loss']['ci']:.4f}" if d else "-"
            da = f"{100 * d['test_accuracy']['mean']:+.2f} ± {100 * d['test_accuracy']['ci']:.2f}" if d else "-"
            lines.append(
                f"| {name} | {r['kind']} | {r['train_size']} | {100 * r['target_share']:.0f}% "
                f"| {r['test_loss']['mean']:.4f} ± {r['test_loss']['ci']:.4f} "
                f"| {100 * r['test_accuracy']['mean']:.2f} ± {100 * r['test_accuracy']['ci']:.2f} | {dl} | {da} "
                f"| {r['cost']['training_runs']:.1f} / {r['cost']['seconds']:.0f} |")
        lines.append("")
        notes = []
        for name, r in rows.items():
            info = r["info"]
            if "direction" in info:
                notes.append(f"perplexity kept the {info['direction']}est-loss documents "
                             f"(val loss {json.dumps({a: round(b, 4) for a, b in info['val_loss_by_direction'].items()})})")
            if "chosen_iterate" in info:
                notes.append(f"{name}: iterate {info['chosen_iterate']} chosen on val (subset val losses "
                             f"{[round(v, 4) for v in info['subset_val_loss_by_iterate']]}; weighted val objective "
                             f"along the descent {[round(v, 4) for v in info['val_objective']]})")
        if notes:
            lines += ["Choices on validation: " + "; ".join(notes) + ".", ""]
    comp = ["| method | " + " | ".join(sorted(report["pool_composition"])) + " |",
            "|---|" + "---|" * len(report["pool_composition"])]
    first = next(iter(report["tables"].values()))
    comp.append("| pool | " + " | ".join(str(report["pool_composition"][s]) for s in sorted(report["pool_composition"])) + " |")
    for name, r in first.items():
        comp.append(f"| {name} | " + " | ".join(str(r["composition"].get(s, 0)) for s in sorted(report["pool_composition"])) + " |")
    lines += ["### What each method kept (first budget; source labels are diagnostics no method reads)", ""] + comp
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, generated: str) -> None:
    old = path.read_text() if path.is_file() else ""
    if BEGIN in old and END in old:
        text = old[: old.index(BEGIN)] + generated + old[old.index(END) + len(END) + 1 :]
    else:
        text = (old.rstrip() + "\n\n" if old else "# Language-model data selection\n\n") + generated
    atomic_write_bytes(path, text.encode())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "lm_select")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "lm_select.md",
                        help="Markdown file (its generated part is replaced); the JSON goes next to it")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.1])
    parser.add_argument("--pool", type=int, default=800)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--meta-steps", type=int, default=4)
    parser.add_argument("--eval-seeds", type=int, default=5)
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA table")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a result")
    parser.add_argument("--fresh", action="store_true", help="discard the run directory's cache")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the machine's other core belongs to someone else
    s = settings(args)
    run_dir = RunDir(args.run_dir, config_dict(s), args.fresh)
    ctx = build_context(s, run_dir)
    chosen = selections(ctx, s, run_dir)
    evals = evaluations(ctx, s, chosen, run_dir)
    report = summarise(s, ctx, chosen, evals, time.perf_counter() - _T0)
    write_json(args.out.with_suffix(".json"), report)
    write_markdown(args.out, markdown(report))
    log(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return report


if __name__ == "__main__":
    main()
