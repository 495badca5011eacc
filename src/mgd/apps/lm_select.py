r"""Language-model data selection: the paper's LESS setting, small enough for one CPU thread.

Goal (``protocols.md``, "Language-model data selection"). A pool of ``N`` fixed-length text
documents from mixed sources and a *target domain* given by a few validation documents. Pick
``k = budget · N`` documents; a GPT-2-style character model, pretrained briefly on general
text, is fine-tuned on them for a fixed ``T`` steps (equal compute for every subset) and
scored by its loss per character on held-out *test* documents of the target domain.

**The pool** (:func:`build_pool`, :class:`PoolRecipe`) is built at run time from files every
CPython 3.11 installation has, read from ``sysconfig.get_paths()["stdlib"]``:

* ``code/<family>``: the source code of standard-library packages (``email/``, ``json/``,
  ``asyncio/``, ...; test folders excluded), files in sorted order;
* ``docstring``: the docstrings (``ast.get_docstring``, no import) of single-file modules;
* ``license``: the ``LICENSE.txt`` of the standard library (else ``copyright``/``credits``);
* ``junk/shuffled`` (a real document with its characters permuted), ``junk/repeated`` (one
  short line repeated), ``junk/near-duplicate`` (a pool document with 10% of its characters
  replaced).

Text is normalised (tabs to 4 spaces, characters outside printable ASCII and newline to
``?``) and cut into consecutive non-overlapping chunks of ``doc_chars`` characters; chunks
that are mostly blank are dropped and each distinct chunk is kept once. The target domain is
one family's source (``code/email`` by default): its chunks are shuffled with the recipe's
seed and split into a validation split (tens of documents), a disjoint test split and a
fraction mixed into the pool, so that selection has something to find. A separate
*general* split (code of the other families, docstrings, license; no target, no junk) is
used only for pretraining. Every random choice comes from ``numpy.random.default_rng`` with
the recipe's seed, so the pool is a pure function of the recipe and the Python version.

**Tokeniser** (:func:`encode`): one id per character, ``' '..'~'`` -> 1..95 (the scheme of
``examples/gpt_lm.py``), newline -> 96, 0 for anything else and padding.

**Model and fine-tuning** (:func:`gpt2`, :func:`pretrain`, :func:`finetune_run`): a random
``GPT2LMHeadModel`` is pretrained with plain ``torch.optim.AdamW`` on the general split with
a fixed seed; every method and seed then starts from those weights. Fine-tuning is an
:func:`mgd.make_run` run: AdamW, 10% warm-up then cosine, clipping at 1, dropout on; either
every parameter (``regime="full"``) or a ``peft`` LoRA adapter (``regime="lora"``). The
evaluation seed sets the batch order, the dropout masks and (LoRA) the adapter's init.

**Methods** (each returns exactly ``k`` distinct indices; the validation split is used for
every choice, the test split only by :func:`evaluate_subset` in the final table):

* ``random``;
* ``less`` (Xia et al., ICML 2024): :func:`select_less`;
* ``dsir`` (Xie et al., NeurIPS 2023): :func:`dsir_log_weights`, :func:`gumbel_top_k`;
* ``perplexity``: :func:`perplexity_scores`, direction chosen on validation;
* ``embedding``: :func:`embedding_scores`;
* ``mgd``: :func:`mgd_trajectory` then :func:`mgd_select` (exact metagradients of the
  validation loss with respect to per-document weights, by REPLAY);
* references (never "a baseline"): ``full`` (the whole pool) and ``oracle`` (the
  target-domain documents in the pool, by the source label, which no method reads).

References:
    Engstrom et al., *Optimizing ML Training with Metagradient Descent*, arXiv 2503.13751;
    Xia et al., *LESS: Selecting Influential Data for Targeted Instruction Tuning*, ICML 2024;
    Xie et al., *Data Selection for Language Models via Importance Resampling*, NeurIPS 2023.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import functools
import math
import re
import sysconfig
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

import mgd
from mgd.apps.protocol import training_run_seconds
from mgd.apps.select import adam_features, less_scores, rademacher_project, top_k
from mgd.descent import Box, SignedStep
from mgd.errors import UserError
from mgd.evaluation import mean_ci

__all__ = [
    "VOCAB", "PAD_ID", "NEWLINE_ID", "encode", "decode", "normalise_text", "chunk_text",
    "PoolRecipe", "LMPool", "build_pool", "tokenize",
    "ModelConfig", "FineTune", "gpt2", "pretrain", "add_lora", "LMContext", "make_context",
    "finetune_run", "train_subset", "evaluate_state", "evaluate_subset", "val_loss_of_subset",
    "measure_run_seconds", "source_chunks",
    "Selection", "select_random", "select_full", "select_oracle",
    "per_document_grads", "select_less",
    "ngram_features", "dsir_log_weights", "gumbel_top_k", "select_dsir",
    "perplexity_scores", "select_perplexity", "embedding_scores", "select_embedding",
    "MGDSettings", "mgd_problem", "mgd_trajectory", "mgd_select",
    "paired_difference",
]

# =========================================================================== tokeniser

#: 0 = padding / any other character, 1..95 = ' '..'~', 96 = newline.
VOCAB = 97
PAD_ID = 0
NEWLINE_ID = 96


def encode(text: str) -> list[int]:
    """One id per character: printable ASCII ``' '..'~'`` -> 1..95, ``'\\n'`` -> 96, else 0."""
    return [ord(c) - 31 if 32 <= ord(c) <= 126 else (NEWLINE_ID if c == "\n" else PAD_ID) for c in text]


def decode(ids: Sequence[int]) -> str:
    """Inverse of :func:`encode` on printable ASCII and newline (id 0 reads as ``'?'``)."""
    return "".join(chr(i + 31) if 1 <= i <= 95 else ("\n" if i == NEWLINE_ID else "?") for i in ids)


_OTHER = re.compile(r"[^\x20-\x7e\n]")


def normalise_text(text: str) -> str:
    """Tabs to 4 spaces, ``\\r\\n`` to ``\\n``, anything outside printable ASCII + newline to ``?``."""
    return _OTHER.sub("?", text.replace("\r\n", "\n").expandtabs(4))


def chunk_text(text: str, length: int, *, min_fill: float = 0.5) -> list[str]:
    """Consecutive non-overlapping chunks of exactly ``length`` characters of the normalised
    text; the tail and chunks with fewer than ``min_fill · length`` non-blank characters are
    dropped (blank runs teach nothing but spaces)."""
    text = normalise_text(text)
    chunks = (text[i : i + length] for i in range(0, len(text) - length + 1, length))
    return [c for c in chunks if len(c.replace(" ", "").replace("\n", "")) >= min_fill * length]


def tokenize(docs: Sequence[str], device="cpu") -> dict[str, Tensor]:
    """``{"input_ids", "attention_mask", "labels"}`` of shape ``(N, L)``, ``L`` the longest
    document; shorter ones are right-padded (id 0, mask 0, label -100)."""
    length = max((len(d) for d in docs), default=1)
    ids = torch.full((len(docs), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(docs), length), dtype=torch.long)
    for i, doc in enumerate(docs):
        tokens = encode(doc)
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, : len(tokens)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


# =========================================================================== the pool

#: Package families whose source code makes up ``code/<family>`` documents.
CODE_FAMILIES = ("asyncio", "concurrent", "email", "html", "http", "importlib", "json", "logging",
                 "unittest", "urllib", "xml")
#: Single-file standard-library modules whose docstrings make up ``docstring`` documents.
DOCSTRING_MODULES = ("argparse", "ast", "base64", "bisect", "calendar", "collections/__init__", "configparser",
                     "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "enum", "fnmatch",
                     "fractions", "functools", "glob", "heapq", "inspect", "ipaddress", "locale", "os",
                     "pathlib", "pickle", "pprint", "random", "shlex", "shutil", "statistics", "string",
                     "subprocess", "tempfile", "textwrap", "threading", "typing", "uuid", "zipfile")


@dataclass(frozen=True)
class PoolRecipe:
    """Everything that defines the pool, the target splits and the general split.

    Attributes:
        target: the code family that is the target domain.
        pool_size: documents in the pool.
        doc_chars: characters per document.
        target_fraction: share of the pool that is target-domain documents.
        docstring_fraction, license_fraction, junk_fraction: shares of the pool; the rest is
            the code of the other families. The junk is split equally between shuffled,
            repeated-line and near-duplicate documents.
        n_val, n_test: target validation and test documents.
        n_general: general (pretraining) documents.
        seed: every random choice of the recipe.
    """

    target: str = "email"
    pool_size: int = 800
    doc_chars: int = 64
    target_fraction: float = 0.15
    docstring_fraction: float = 0.2
    license_fraction: float = 0.05
    junk_fraction: float = 0.25
    n_val: int = 40
    n_test: int = 300
    n_general: int = 800
    families: tuple[str, ...] = CODE_FAMILIES
    docstring_modules: tuple[str, ...] = DOCSTRING_MODULES
    seed: int = 0

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True, eq=False)
class LMPool:
    """The pool and the target splits.

    Attributes:
        docs, sources: the pool documents and their source labels (diagnostic only).
        val, test: target-domain validation and test documents (disjoint from each other and
            from the pool).
        general: pretraining documents (disjoint from the pool and the target).
        recipe: the recipe that built it.
    """

    docs: list[str]
    sources: list[str]
    val: list[str]
    test: list[str]
    general: list[str]
    recipe: PoolRecipe

    @property
    def target_source(self) -> str:
        return f"code/{self.recipe.target}"

    @property
    def is_target(self) -> np.ndarray:
        return np.array([s == self.target_source for s in self.sources])

    def fingerprint(self) -> str:
        """SHA-256 of every document and label, in order."""
        h = hashlib.sha256()
        for part in (self.docs, self.sources, self.val, self.test, self.general):
            for text in part:
                h.update(text.encode() + b"\0")
            h.update(b"\1")
        return h.hexdigest()

    def composition(self, indices: np.ndarray) -> dict[str, int]:
        """Counts per source label of the documents ``indices``."""
        out: dict[str, int] = {}
        for i in np.asarray(indices, dtype=np.int64):
            out[self.sources[i]] = out.get(self.sources[i], 0) + 1
        return dict(sorted(out.items()))


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _family_files(family: str) -> list[Path]:
    root = stdlib_dir() / family
    if not root.is_dir():
        raise UserError(f"the standard library has no package {family!r} at {root}; choose another family")
    files = [p for p in root.rglob("*.py")
             if not any(part.startswith("test") or part == "__pycache__" for part in p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _docstrings(module: str) -> list[str]:
    """The module's docstrings (module, classes, functions; ``ast.walk`` order), without import."""
    path = stdlib_dir() / f"{module}.py"
    if not path.is_file():
        return []
    tree = ast.parse(_read(path))
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
    return docs


def _license_text() -> str:
    path = stdlib_dir() / "LICENSE.txt"
    if path.is_file():
        return _read(path)
    # site's _Printer objects: str() gives the short text; good enough as a fallback
    return "\n\n".join(str(getattr(builtins, name, "")) for name in ("copyright", "credits", "license"))


def _unique(chunks: list[str], seen: set[str]) -> list[str]:
    out = []
    for c in chunks:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def _take(rng: np.random.Generator, items: list[str], n: int, what: str) -> tuple[list[str], list[str]]:
    """``n`` items drawn without replacement (in a shuffled order) and the rest."""
    if n > len(items):
        raise UserError(f"the recipe needs {n} {what} documents but only {len(items)} exist; lower the sizes")
    order = rng.permutation(len(items))
    return [items[i] for i in order[:n]], [items[i] for i in order[n:]]


@functools.lru_cache(maxsize=4)
def source_chunks(families: tuple[str, ...], docstring_modules: tuple[str, ...], length: int):
    """``(code, docstrings, license)``: every source's chunks, read once in a fixed order
    (cached: reading the standard library takes seconds). A chunk seen before (e.g. a licence
    header repeated across files) belongs to its first source only."""
    seen: set[str] = set()
    code = {f: tuple(_unique([c for p in _family_files(f) for c in chunk_text(_read(p), length)], seen))
            for f in families}
    docstrings = tuple(_unique([c for m in docstring_modules for d in _docstrings(m)
                                for c in chunk_text(d, length)], seen))
    license_docs = tuple(_unique(chunk_text(_license_text(), length), seen))
    return code, docstrings, license_docs


def build_pool(recipe: PoolRecipe = PoolRecipe()) -> LMPool:
    """The pool, target splits and general split of ``recipe`` (see the module docstring).

    Deterministic: the same recipe on the same Python version gives the same bytes
    (:meth:`LMPool.fingerprint`).
    """
    if recipe.target not in recipe.families:
        raise UserError(f"the target {recipe.target!r} must be one of the code families {recipe.families}")
    L = recipe.doc_chars
    rng = np.random.default_rng(recipe.seed)
    code, docstrings, license_docs = source_chunks(recipe.families, recipe.docstring_modules, L)
    code, docstrings, license_docs = {f: list(c) for f, c in code.items()}, list(docstrings), list(license_docs)

    n = recipe.pool_size
    n_target = int(round(recipe.target_fraction * n))
    n_doc = int(round(recipe.docstring_fraction * n))
    n_lic = int(round(recipe.license_fraction * n))
    n_junk = int(round(recipe.junk_fraction * n))
    n_code = n - n_target - n_doc - n_lic - n_junk
    if n_code < 0:
        raise UserError("the pool fractions add up to more than 1")

    val, rest = _take(rng, code[recipe.target], recipe.n_val, "target")
    test, rest = _take(rng, rest, recipe.n_test, "target")
    target_pool, _ = _take(rng, rest, n_target, "target")

    other_code = [(f, c) for f in recipe.families if f != recipe.target for c in code[f]]
    order = rng.permutation(len(other_code))
    other_code = [other_code[i] for i in order]
    if n_code > len(other_code):
        raise UserError(f"the recipe needs {n_code} code documents but only {len(other_code)} exist")
    pool_code, spare_code = other_code[:n_code], other_code[n_code:]
    pool_doc, spare_doc = _take(rng, docstrings, n_doc, "docstring")
    pool_lic, spare_lic = _take(rng, license_docs, n_lic, "license")

    docs = [c for c in target_pool] + [c for _, c in pool_code] + pool_doc + pool_lic
    sources = ([f"code/{recipe.target}"] * len(target_pool) + [f"code/{f}" for f, _ in pool_code]
               + ["docstring"] * len(pool_doc) + ["license"] * len(pool_lic))

    # General (pretraining) text: from what the pool did not take, proportionally drawn.
    spare = [c for _, c in spare_code] + spare_doc + spare_lic
    general, spare = _take(rng, spare, recipe.n_general, "general")

    # Junk, built from real non-target text that is in neither the pool nor the general split
    # (so a near-duplicate's original is still in the pool, as in a scraped corpus).
    n_shuf = n_junk // 3
    n_rep = n_junk // 3
    n_near = n_junk - n_shuf - n_rep
    sources_for_junk, _ = _take(rng, spare, n_shuf + n_rep, "spare")
    junk, junk_src = [], []
    for text in sources_for_junk[:n_shuf]:
        junk.append("".join(text[i] for i in rng.permutation(L)))
        junk_src.append("junk/shuffled")
    for text in sources_for_junk[n_shuf:]:
        lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 8] or [text.strip()[:16] or "junk"]
        line = lines[int(rng.integers(len(lines)))]
        junk.append(((line + "\n") * (L // (len(line) + 1) + 1))[:L])
        junk_src.append("junk/repeated")
    originals = rng.choice(len(docs), size=n_near, replace=False)
    printable = [chr(c) for c in range(32, 127)]
    for i in originals:
        chars = list(docs[int(i)])
        for j in rng.choice(L, size=max(1, L // 10), replace=False):
            chars[int(j)] = printable[int(rng.integers(len(printable)))]
        junk.append("".join(chars))
        junk_src.append("junk/near-duplicate")
    docs += junk
    sources += junk_src

    order = rng.permutation(len(docs))  # mix sources so that no index range means anything
    return LMPool([docs[i] for i in order], [sources[i] for i in order], val, test, general, recipe)


# =========================================================================== model and runs


@dataclass(frozen=True)
class ModelConfig:
    """The GPT-2 shape and its pretraining."""

    width: int = 64
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    context: int = 64
    pretrain_steps: int = 400
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    seed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class FineTune:
    """The one fine-tuning recipe used by every method's evaluation (and by MGD's crafting).

    ``steps`` is fixed whatever the subset size (equal compute); an epoch is a fresh
    permutation of the subset.
    """

    steps: int = 80
    batch_size: int = 16
    lr: float = 1e-3
    lora_lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    clip_norm: float = 1.0
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def gpt2(config: ModelConfig, *, dtype=torch.float32, device="cpu"):
    """A randomly initialised ``GPT2LMHeadModel`` (seeded without touching the caller's RNG)."""
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=config.context, n_embd=config.width, n_layer=config.layers,
        n_head=config.heads, resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        bos_token_id=PAD_ID, eos_token_id=PAD_ID, pad_token_id=PAD_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = transformers.GPT2LMHeadModel(cfg)
    return model.to(dtype=mgd.task.as_dtype(dtype), device=device)


def pretrain(model: torch.nn.Module, data: Mapping[str, Tensor], config: ModelConfig) -> list[float]:
    """Plain ``torch.optim.AdamW`` on the mean per-document next-character loss, in place
    (dropout on, seeded by ``config.seed`` without touching the caller's RNG); returns the
    training losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_lr, weight_decay=0.01)
    loss_fn = mgd.losses.causal_lm()
    n = len(data["input_ids"])
    losses = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for step in range(config.pretrain_steps):
            index = torch.randperm(n)[: config.pretrain_batch]
            batch = {k: v[index] for k, v in data.items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = loss_fn(out, batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group in optimizer.param_groups:  # linear decay to 10%: a stable end point
                group["lr"] = config.pretrain_lr * (1.0 - 0.9 * step / max(1, config.pretrain_steps))
            optimizer.step()
            losses.append(float(loss.detach()))
    model.zero_grad(set_to_none=True)
    model.eval()
    return losses


def add_lora(model: torch.nn.Module, recipe: FineTune, *, seed: int) -> torch.nn.Module:
    """Wrap ``model`` with a LoRA adapter (``peft``); only the adapter stays trainable. The
    adapter's random ``A`` is drawn from ``seed`` (``B = 0``, so the model is unchanged)."""
    import peft

    dtype = next(model.parameters()).dtype
    config = peft.LoraConfig(r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank,
                             target_modules=list(recipe.lora_targets), lora_dropout=0.0,
                             fan_in_fan_out=True, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft asks transformers deprecated questions
        torch.manual_seed(seed + 7919)
        wrapped = peft.get_peft_model(model, config)
    return wrapped.to(dtype=dtype)


@dataclass(eq=False)
class LMContext:
    """What every method and the evaluation share: the pool, its tensors, the pretrained model.

    ``run_seconds`` is the wall time of one fine-tuning run of the recipe (the unit of
    "training-run equivalents"); measure it with :func:`measure_run_seconds`.
    """

    pool: LMPool
    model_config: ModelConfig
    recipe: FineTune
    pretrained: dict[str, Tensor]
    pool_data: dict[str, Tensor]
    val_data: dict[str, Tensor]
    test_data: dict[str, Tensor]
    dtype: torch.dtype = torch.float32
    run_seconds: float = float("nan")
    pretrain_seconds: float = 0.0
    pretrain_losses: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.pool.docs)

    def k_of(self, budget: float) -> int:
        if not 0.0 < budget <= 1.0:
            raise UserError(f"the budget must be a fraction in (0, 1], got {budget}")
        k = int(round(budget * self.n))
        if k < 1:
            raise UserError(f"a budget of {budget:g} keeps no document of {self.n}; raise it")
        return k

    def base_model(self) -> torch.nn.Module:
        """A fresh copy of the pretrained model (eval mode)."""
        model = gpt2(self.model_config, dtype=self.dtype)
        model.load_state_dict({k: v.to(self.dtype) for k, v in self.pretrained.items()})
        return model.eval()

    def runs(self, seconds: float) -> float:
        return seconds / self.run_seconds if self.run_seconds > 0 else float("nan")


def make_context(pool: LMPool, model_config: ModelConfig = ModelConfig(), recipe: FineTune = FineTune(), *,
                 dtype=torch.float32, pretrained: Mapping[str, Tensor] | None = None) -> LMContext:
    """Tokenise the splits and pretrain the model once (or reuse ``pretrained`` weights)."""
    dtype = mgd.task.as_dtype(dtype)
    started = time.perf_counter()
    losses: list[float] = []
    if pretrained is None:
        model = gpt2(model_config, dtype=torch.float32)
        if model_config.pretrain_steps > 0:
            losses = pretrain(model, tokenize(pool.general), model_config)
        pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return LMContext(pool, model_config, recipe, dict(pretrained), tokenize(pool.docs), tokenize(pool.val),
                     tokenize(pool.test), dtype=dtype, pretrain_seconds=time.perf_counter() - started,
                     pretrain_losses=losses)


def _subset(data: Mapping[str, Tensor], indices) -> dict[str, Tensor]:
    index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    return {k: v[index] for k, v in data.items()}


def finetune_run(ctx: LMContext, data: Mapping[str, Tensor], *, regime: str, seed: int,
                 metaparams: Sequence[str] = ()) -> mgd.TrainingRun:
    """The fine-tuning run of the recipe on ``data`` from the pretrained model.

    ``regime``: ``"full"`` (every parameter) or ``"lora"`` (the adapter only). ``seed``: batch
    order, dropout masks and the adapter's initialisation.
    """
    if regime not in ("full", "lora"):
        raise UserError(f"unknown fine-tuning regime {regime!r}; choose 'full' or 'lora'")
    r = ctx.recipe
    model = ctx.base_model()
    if regime == "lora":
        model = add_lora(model, r, seed=seed)
    n = len(data["input_ids"])
    return mgd.make_run(
        model, optimizer=mgd.Adam(decoupled=True), data=dict(data), steps=r.steps,
        batch_size=min(r.batch_size, n), lr=r.lr if regime == "full" else r.lora_lr,
        weight_decay=r.weight_decay, loss=mgd.losses.causal_lm(),
        schedule=mgd.schedules.warmup_cosine(warmup_steps=max(1, int(r.warmup_fraction * r.steps))),
        clip_norm=r.clip_norm, seed=seed, metaparams=list(metaparams),
    )


def evaluate_state(run: mgd.TrainingRun, state, data: Mapping[str, Tensor], batch: int = 128) -> dict[str, float]:
    """Mean loss per character (nats; documents have equal length, so the mean of per-document
    means) and next-character accuracy of a trained state on ``data``, eval mode."""
    named = run.named_tensors(state.params, state.buffers)
    loss = mgd.Objective(run.stateless, dict(data), loss=mgd.losses.causal_lm(), batch_size=batch)
    acc = mgd.Metric(run.stateless, dict(data), mgd.losses.next_token_accuracy(), batch_size=batch)
    with torch.no_grad(), mgd.step.math_attention():
        return {"loss": float(loss(named)), "accuracy": float(acc(named))}


def train_subset(ctx: LMContext, indices, *, regime: str, seed: int):
    """Fine-tune on the pool documents ``indices``; returns ``(run, final_state)``."""
    run = finetune_run(ctx, _subset(ctx.pool_data, indices), regime=regime, seed=seed)
    return run, run.run()


def val_loss_of_subset(ctx: LMContext, indices, *, regime: str, seed: int) -> float:
    """Validation loss after fine-tuning on ``indices`` (what methods may use for choices)."""
    run, state = train_subset(ctx, indices, regime=regime, seed=seed)
    return evaluate_state(run, state, ctx.val_data)["loss"]


def evaluate_subset(ctx: LMContext, indices, *, regime: str, seed: int) -> dict[str, float]:
    """Fine-tune on ``indices`` with an evaluation seed; validation and **test** loss per
    character and next-character accuracy (the only place the test split is read)."""
    started = time.perf_counter()
    run, state = train_subset(ctx, indices, regime=regime, seed=seed)
    val = evaluate_state(run, state, ctx.val_data)
    test = evaluate_state(run, state, ctx.test_data)
    return {"seed": seed, "val_loss": val["loss"], "val_accuracy": val["accuracy"], "test_loss": test["loss"],
            "test_accuracy": test["accuracy"], "seconds": time.perf_counter() - started}


def measure_run_seconds(ctx: LMContext, *, regime: str = "full", seed: int = 0) -> float:
    """Seconds of one fine-tuning run (:func:`mgd.apps.protocol.training_run_seconds`). The recipe runs ``T`` steps of
    the same batch size whatever the subset, so the time does not depend on which one."""
    idx = np.arange(min(ctx.n, ctx.recipe.batch_size * 4))
    return training_run_seconds(finetune_run(ctx, _subset(ctx.pool_data, idx), regime=regime, seed=seed))


# =========================================================================== selections


@dataclass
class Selection:
    """A method's chosen subset and what it cost.

    ``seconds`` / ``runs``: wall time and training-run equivalents (``seconds`` divided by one
    fine-tuning run's time; validation retraining counted at its measured time too).
    ``kind``: ``"mgd"``, ``"baseline"`` or ``"reference"``.
    """

    name: str
    indices: np.ndarray
    seconds: float
    runs: float
    kind: str = "baseline"
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "indices": [int(i) for i in self.indices], "seconds": self.seconds,
                "runs": self.runs, "kind": self.kind, "info": self.info}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Selection":
        return cls(d["name"], np.asarray(d["indices"], dtype=np.int64), float(d["seconds"]), float(d["runs"]),
                   d["kind"], dict(d["info"]))


def _selection(ctx: LMContext, name: str, indices, seconds: float, kind: str = "baseline", **info) -> Selection:
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    if len(np.unique(indices)) != len(indices) or (len(indices) and (indices.min() < 0 or indices.max() >= ctx.n)):
        raise AssertionError(f"{name} produced invalid indices; please report this bug")
    info.setdefault("composition", ctx.pool.composition(indices))
    return Selection(name, indices, seconds, ctx.runs(seconds), kind, info)


def select_random(ctx: LMContext, k: int, *, seed: int = 0) -> Selection:
    """``k`` uniformly random documents."""
    idx = np.random.default_rng([seed, 0x5EED]).choice(ctx.n, size=k, replace=False)
    return _selection(ctx, "random", idx, 0.0)


def select_full(ctx: LMContext) -> Selection:
    """Reference: the whole pool (not a selection)."""
    return _selection(ctx, "full", np.arange(ctx.n), 0.0, kind="reference")


def select_oracle(ctx: LMContext, k: int, *, seed: int = 0) -> Selection:
    """Reference: the target-domain documents of the pool by the source label (``k`` random
    ones if there are more; all of them, fewer than ``k``, otherwise)."""
    target = np.flatnonzero(ctx.pool.is_target)
    idx = np.random.default_rng([seed, 0x0AC]).permutation(target)[:k]
    return _selection(ctx, "oracle", idx, 0.0, kind="reference", note=f"{len(idx)} target documents (k = {k})")


# ----------------------------------------------------------------------------- LESS


def per_document_grads(model: torch.nn.Module, params: Mapping[str, Tensor], data: Mapping[str, Tensor]) -> Tensor:
    """``(N, P)``: the gradient of each document's next-character loss with respect to
    ``params`` (a name -> tensor dict of some of ``model``'s parameters; the others are
    constants), eval mode, flattened in ``params`` order.

    One backward pass per document. ``torch.func.vmap(grad(...))`` would batch them, but
    transformers' mask preparation branches on tensor values (``padding_mask.all()``, a
    padding warning), which ``vmap`` refuses; correctness first.
    """
    from torch.func import functional_call

    loss_fn = mgd.losses.causal_lm()
    names = list(params)
    leaves = {n: t.detach().requires_grad_(True) for n, t in params.items()}
    rows = []
    model.eval()
    with torch.enable_grad(), mgd.step.math_attention():
        for i in range(len(data["input_ids"])):
            batch = {k: v[i : i + 1] for k, v in data.items()}
            out = functional_call(model, leaves, (), {"input_ids": batch["input_ids"],
                                                      "attention_mask": batch["attention_mask"]}, strict=False)
            grads = torch.autograd.grad(loss_fn(out, batch)[0], [leaves[n] for n in names])
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _warmup_less(ctx: LMContext, indices: np.ndarray, *, epochs: int, seed: int, batch_size: int, lr: float):
    """LoRA warm-up with ``torch.optim.AdamW`` (linear LR decay), saving the adapter and the
    Adam moments after each epoch. Returns ``(model, checkpoints)``; each checkpoint is
    ``(adapter params, exp_avg, exp_avg_sq, mean LR of the epoch)``."""
    model = add_lora(ctx.base_model(), ctx.recipe, seed=seed)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=lr, weight_decay=0.0, eps=1e-8)
    data = _subset(ctx.pool_data, indices)
    loss_fn = mgd.losses.causal_lm()
    n = len(indices)
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    checkpoints = []
    step = 0
    with torch.random.fork_rng(devices=[]), mgd.step.math_attention():
        torch.manual_seed(seed)
        for _ in range(epochs):
            model.train()
            order = torch.randperm(n)
            lrs = []
            for b in range(steps_per_epoch):
                index = order[b * batch_size : (b + 1) * batch_size]
                batch = {k: v[index] for k, v in data.items()}
                current = lr * (1.0 - step / total)
                for group in optimizer.param_groups:
                    group["lr"] = current
                lrs.append(current)
                loss = loss_fn(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                               batch).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
            state = [optimizer.state[p] for p in trainable.values()]
            checkpoints.append((
                {n: p.detach().clone() for n, p in trainable.items()},
                torch.cat([s["exp_avg"].reshape(-1) for s in state]).clone(),
                torch.cat([s["exp_avg_sq"].reshape(-1) for s in state]).clone(),
                float(np.mean(lrs)),
            ))
    model.eval()
    return model, checkpoints


def select_less(ctx: LMContext, ks: Sequence[int], *, seed: int = 0, fraction: float = 0.05, epochs: int = 4,
                dim: int = 1024, lr: float | None = None) -> list[Selection]:
    """LESS (:func:`mgd.apps.select.less_scores`, the same definition as the classification
    pools'): LoRA warm-up on a random ``fraction`` of the pool for ``epochs`` epochs with Adam
    (checkpoint + moments per epoch), per-document gradients of the adapter at each
    checkpoint, train feature = :func:`mgd.apps.select.adam_features`, validation feature =
    the plain gradient, both Rademacher-projected to ``dim``
    (:func:`mgd.apps.select.rademacher_project`) and normalised; top ``k`` for each ``k`` in
    ``ks`` (one scoring, cost shared)."""
    started = time.perf_counter()
    rng = np.random.default_rng([seed, 0x1E55])
    warm = rng.choice(ctx.n, size=max(ctx.recipe.batch_size, int(round(fraction * ctx.n))), replace=False)
    model, checkpoints = _warmup_less(ctx, warm, epochs=epochs, seed=seed, batch_size=min(8, len(warm)),
                                      lr=ctx.recipe.lora_lr if lr is None else lr)
    train_f, val_f, lrs = [], [], []
    for params, exp_avg, exp_avg_sq, epoch_lr in checkpoints:
        g_pool = per_document_grads(model, params, ctx.pool_data)
        g_val = per_document_grads(model, params, ctx.val_data)
        # one projection for every checkpoint, as LESS projects all its gradients alike
        train_f.append(rademacher_project(adam_features(g_pool, exp_avg, exp_avg_sq), dim, seed=seed + 1))
        val_f.append(rademacher_project(g_val, dim, seed=seed + 1))
        lrs.append(epoch_lr)
    # one subtask: the target domain
    scores = less_scores(train_f, val_f, np.zeros(len(val_f[0]), dtype=np.int64), lrs)
    seconds = time.perf_counter() - started
    return [_selection(ctx, "less", top_k(scores, k), seconds, warmup_docs=len(warm), epochs=epochs,
                       projection_dim=dim, features=int(g_pool.shape[1])) for k in ks]


# ----------------------------------------------------------------------------- DSIR


def ngram_features(doc: str, buckets: int) -> np.ndarray:
    """Hashed character unigram + bigram counts (CRC-32 of the n-gram's bytes mod ``buckets``;
    Python's ``hash`` is salted per process, so it is not used)."""
    counts = np.zeros(buckets, dtype=np.float64)
    grams = list(doc) + [doc[i : i + 2] for i in range(len(doc) - 1)]
    for gram in grams:
        counts[zlib.crc32(gram.encode()) % buckets] += 1
    return counts


def dsir_log_weights(pool_docs: Sequence[str], target_docs: Sequence[str], *, buckets: int = 10000,
                     smoothing: float = 1.0) -> np.ndarray:
    r"""DSIR's log importance weights (Xie et al. 2023):

    .. math:: \log w_i = \sum_f c_{if} (\log p_\text{target}(f) - \log p_\text{pool}(f)),

    with ``c_{if}`` the hashed n-gram counts of document ``i`` (:func:`ngram_features`) and
    ``p`` bag-of-n-grams models (add-``smoothing`` counts, normalised) fitted to the target
    documents and to the pool."""
    pool = np.stack([ngram_features(d, buckets) for d in pool_docs])
    target = np.stack([ngram_features(d, buckets) for d in target_docs])
    log_p_target = np.log(target.sum(0) + smoothing) - np.log(target.sum() + smoothing * buckets)
    log_p_pool = np.log(pool.sum(0) + smoothing) - np.log(pool.sum() + smoothing * buckets)
    return pool @ (log_p_target - log_p_pool)


def gumbel_top_k(log_weights: np.ndarray, k: int, *, seed: int) -> np.ndarray:
    """Sample ``k`` indices without replacement with probabilities proportional to
    ``exp(log_weights)`` (sequentially): the top ``k`` of ``log w + Gumbel noise``."""
    gumbel = np.random.default_rng([seed, 0xD51]).gumbel(size=len(log_weights))
    return top_k(np.asarray(log_weights) + gumbel, k)


def select_dsir(ctx: LMContext, ks: Sequence[int], *, seed: int = 0, buckets: int = 10000) -> list[Selection]:
    """DSIR with the validation split as the target sample."""
    started = time.perf_counter()
    logw = dsir_log_weights(ctx.pool.docs, ctx.pool.val, buckets=buckets)
    seconds = time.perf_counter() - started
    return [_selection(ctx, "dsir", gumbel_top_k(logw, k, seed=seed), seconds, buckets=buckets,
                       features="character unigrams + bigrams") for k in ks]


# ----------------------------------------------------------------------------- perplexity, embedding


@torch.no_grad()
def perplexity_scores(ctx: LMContext, batch: int = 128) -> np.ndarray:
    """Per-document next-character loss under the pretrained model (eval mode)."""
    model = ctx.base_model()
    loss_fn = mgd.losses.causal_lm()
    out = []
    with mgd.step.math_attention():
        for a in range(0, ctx.n, batch):
            b = {k: v[a : a + batch] for k, v in ctx.pool_data.items()}
            out.append(loss_fn(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b))
    return torch.cat(out).double().numpy()


def select_perplexity(ctx: LMContext, ks: Sequence[int], *, regime: str = "full", seed: int = 0) -> list[Selection]:
    """Keep the ``k`` documents the pretrained model finds least (``low``) or most (``high``)
    surprising; the direction is chosen per ``k`` by fine-tuning on both and comparing the
    validation loss (two runs per ``k``, counted in the cost)."""
    started = time.perf_counter()
    scores = perplexity_scores(ctx)
    scoring = time.perf_counter() - started
    out = []
    for k in ks:
        t0 = time.perf_counter()
        trials = {d: top_k(scores, k, largest=(d == "high")) for d in ("low", "high")}
        val = {d: val_loss_of_subset(ctx, idx, regime=regime, seed=seed) for d, idx in trials.items()}
        best = min(val, key=lambda d: (val[d], d))
        out.append(_selection(ctx, "perplexity", trials[best], scoring + time.perf_counter() - t0,
                              direction=best, val_loss_by_direction=val))
    return out


@torch.no_grad()
def embedding_scores(ctx: LMContext, batch: int = 128) -> np.ndarray:
    r"""Cosine similarity of each pool document's embedding with the mean target embedding,
    an embedding being the mean over positions of the pretrained model's last hidden state
    (after the final layer norm), normalised: :math:`s_i = \cos(e_i, \frac1M\sum_v e_v)`."""
    model = ctx.base_model()

    def embed(data):
        rows = []
        for a in range(0, len(data["input_ids"]), batch):
            out = model(input_ids=data["input_ids"][a : a + batch],
                        attention_mask=data["attention_mask"][a : a + batch], output_hidden_states=True)
            h = out.hidden_states[-1]
            m = data["attention_mask"][a : a + batch, :, None].to(h.dtype)
            rows.append((h * m).sum(1) / m.sum(1).clamp_min(1))
        return torch.nn.functional.normalize(torch.cat(rows).double(), dim=1)

    with mgd.step.math_attention():
        pool, val = embed(ctx.pool_data), embed(ctx.val_data)
    centre = torch.nn.functional.normalize(val.mean(0), dim=0)
    return (pool @ centre).numpy()


def select_embedding(ctx: LMContext, ks: Sequence[int]) -> list[Selection]:
    """Top ``k`` by :func:`embedding_scores`."""
    started = time.perf_counter()
    scores = embedding_scores(ctx)
    seconds = time.perf_counter() - started
    return [_selection(ctx, "embedding", top_k(scores, k), seconds) for k in ks]


# =========================================================================== MGD


@dataclass(frozen=True)
class MGDSettings:
    """MGD's hyperparameters (fixed before the run; nothing tuned on test).

    Attributes:
        meta_steps: metagradient steps.
        step_size: signed step ``α`` on the weights.
        mask_prob: Bernoulli coordinate mask ``p`` (1: every coordinate moves each step).
        wmax: upper bound of the weights' box ``[0, wmax]``.
        regime: the fine-tuning regime differentiated through.
        replay_k: REPLAY branching factor (``None``: the library's default plan).
    """

    meta_steps: int = 4
    step_size: float = 0.25
    mask_prob: float = 1.0
    wmax: float = 2.0
    regime: str = "full"
    replay_k: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def mgd_problem(ctx: LMContext, *, seed: int, regime: str = "full") -> tuple[mgd.TrainingRun, mgd.Objective]:
    """The run MGD differentiates: the fine-tuning recipe on the **whole pool** with one weight
    per document (``data_weights``, loss ``(1/B) Σ_{i∈B_t} w_i ℓ_i``), and the objective, the
    validation loss per character of the final model."""
    run = finetune_run(ctx, ctx.pool_data, regime=regime, seed=seed, metaparams=["data_weights"])
    objective = mgd.Objective(run.stateless, dict(ctx.val_data), loss=mgd.losses.causal_lm(), batch_size=64)
    return run, objective


def mgd_trajectory(ctx: LMContext, settings: MGDSettings = MGDSettings(), *, seeds: Sequence[int] = (0, 1, 2, 3),
                   progress: Callable[[str], None] | None = None) -> dict:
    r"""Metagradient descent on the per-document weights (``method.md`` §6.1, signed steps):

    .. math:: w_{i+1} = \Pi_{[0, w_\max]}\big(w_i - \alpha\,\mathrm{sign}(\nabla_w \varphi(w_i; s_i)) \odot m_i\big),
              \qquad w_0 = \mathbf 1,

    with :math:`\varphi(w; s)` the validation loss after fine-tuning on the pool with weights
    ``w`` and crafting seed ``s`` (seeds rotate), its exact gradient by REPLAY
    (:func:`mgd.metagradient`). Returns the weights ``w_1..w_M``, the per-step metagradients
    normalised by their RMS (for tie-breaking: signed steps leave many weights equal), the
    validation objective at each ``w_i`` and the time spent.
    """
    started = time.perf_counter()
    seeds = list(seeds)
    optimizer = SignedStep(settings.step_size, settings.mask_prob, mask_seed=seeds[0])
    box = Box(0.0, settings.wmax)
    w = torch.ones(ctx.n, dtype=ctx.dtype)
    weights, grads, values, seconds = [], [], [], []
    for i in range(settings.meta_steps):
        t0 = time.perf_counter()
        run, objective = mgd_problem(ctx, seed=seeds[i % len(seeds)], regime=settings.regime)
        result = mgd.metagradient(run, objective, {"data_weights": w}, wrt=["data_weights"], k=settings.replay_k)
        g = result.grads["data_weights"].detach()
        w, _ = optimizer.update(g, w, (), step=i)
        w = box(w)
        weights.append(w.double().numpy().copy())
        grads.append((g / g.pow(2).mean().sqrt().clamp_min(1e-30)).double().numpy())
        values.append(float(result.value))
        seconds.append(time.perf_counter() - t0)
        if progress is not None:
            progress(f"mgd meta-step {i + 1}/{settings.meta_steps}: val objective {result.value:.4f} "
                     f"({seconds[-1]:.1f}s)")
    return {"weights": np.stack(weights), "grads": np.stack(grads), "val_objective": values,
            "step_seconds": seconds, "seconds": time.perf_counter() - started, "seeds": seeds,
            "settings": settings.to_dict()}


def mgd_select(ctx: LMContext, trajectory: Mapping, ks: Sequence[int], *, regime: str = "full",
               seed: int = 0) -> list[Selection]:
    """Top ``k`` of the MGD weights. Ties (the weights move in steps of ``α``) are broken by the
    cumulative normalised metagradient (more negative: up-weighting helps more). The iterate is
    chosen per ``k`` on validation: each iterate's top-``k`` subset is fine-tuned once (crafting
    ``seed``) and the lowest validation loss wins (cost counted)."""
    weights = np.asarray(trajectory["weights"])
    tiebreak = -np.cumsum(np.asarray(trajectory["grads"]), axis=0)
    out = []
    for k in ks:
        t0 = time.perf_counter()
        subsets = [top_k(weights[i], k, tiebreak=tiebreak[i]) for i in range(len(weights))]
        val = [val_loss_of_subset(ctx, s, regime=regime, seed=seed) for s in subsets]
        chosen = int(np.argmin(val))
        seconds = float(trajectory["seconds"]) + time.perf_counter() - t0
        out.append(_selection(ctx, "mgd", subsets[chosen], seconds, kind="mgd", chosen_iterate=chosen + 1,
                              subset_val_loss_by_iterate=val, val_objective=list(trajectory["val_objective"]),
                              settings=dict(trajectory["settings"])))
    return out


# =========================================================================== summaries


def paired_difference(a: Sequence[Mapping], b: Sequence[Mapping], key: str) -> dict[str, float]:
    """Mean and 95% CI of ``a[key] - b[key]`` over seeds evaluated in the same order."""
    if [r["seed"] for r in a] != [r["seed"] for r in b]:
        raise UserError("paired differences need the same seeds in the same order")
    return mean_ci([x[key] - y[key] for x, y in zip(a, b)])
