"""imdb: parquet loading, balanced subsets, cached tokenisation, the bundled offline encoder, clear offline errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from metacore.core.errors import DataError, MetacoreError  # noqa: E402
from metacore.core.task import TaskContext  # noqa: E402
from metacore.plugins import imdb  # noqa: E402

WORDS = ["great", "awful", "movie", "plot", "actor", "boring", "loved", "hated", "scene", "film"]


@pytest.fixture
def imdb_dir(tmp_path):
    rng = np.random.RandomState(0)
    root = tmp_path / "data" / "imdb"
    root.mkdir(parents=True)
    for split, n in (("train", 40), ("test", 20)):
        labels = np.array([0] * (n // 2) + [1] * (n // 2))  # sorted by label, like the real files
        texts = [f"{split} {i} " + " ".join(rng.choice(WORDS, size=rng.randint(3, 40))) for i in range(n)]
        pq.write_table(pa.table({"text": texts, "label": pa.array(labels, type=pa.int64()),
                                 "split": [split] * n}), root / f"{split}.parquet")
    return tmp_path / "data"


def _ctx(data_dir, **options):
    task = imdb.ImdbTask()
    preset = task.preset("smoke")
    return task, TaskContext(preset, task.resolve_options(preset, options), 0, "cpu", data_dir,
                             task.hparam_space().defaults())


def test_balanced_subsets_are_disjoint_balanced_and_fixed():
    labels = [0] * 30 + [1] * 30
    a, b = imdb.balanced_subsets(labels, [10, 7], seed=0)
    assert len(a) == 10 and len(b) == 7 and not set(a) & set(b)
    assert sum(labels[i] for i in a) == 5 and sum(labels[i] for i in b) == 3
    assert imdb.balanced_subsets(labels, [10, 7], seed=0) == [a, b]
    assert imdb.balanced_subsets(labels, [10, 7], seed=1) != [a, b]
    with pytest.raises(DataError, match="only"):
        imdb.balanced_subsets(labels, [62], seed=0)


def test_load_tokenises_once_with_the_bert_vocabulary(imdb_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("METACORE_CACHE_DIR", str(tmp_path / "cache"))
    task, ctx = _ctx(imdb_dir, train_size=12, val_size=6, test_size=8, max_length=16)
    data = task.load_data(ctx)
    assert tuple(data.train[0].shape) == (12, 16) and tuple(data.val[0].shape) == (6, 16)
    assert data.train[1].sum().item() == 6 and data.test[1].sum().item() == 4  # balanced
    tokenizer = imdb.load_tokenizer(imdb.resolve_model("minilm")[0])
    assert tokenizer.convert_tokens_to_ids("great") == 2307  # bert-base-uncased's vocabulary
    ids = data.train[0][0].tolist()
    assert ids[0] == tokenizer.cls_token_id and tokenizer.sep_token_id in ids
    assert data.info["data.train"] == 12 and data.info["data.max_length"] == 16
    # val reviews come from the training split, disjoint from the training subset
    train_texts = {tokenizer.decode(r, skip_special_tokens=True) for r in data.train[0].tolist()}
    val_texts = {tokenizer.decode(r, skip_special_tokens=True) for r in data.val[0].tolist()}
    assert not train_texts & val_texts and all(t.startswith("train ") for t in val_texts)

    class NoTokenising:
        def __init__(self, inner):
            self.inner = inner
            self.pad_token_id = inner.pad_token_id

        def get_vocab(self):
            return self.inner.get_vocab()

        def __call__(self, *a, **k):
            pytest.fail("tokenised twice")

    monkeypatch.setattr(imdb, "load_tokenizer", lambda path: NoTokenising(tokenizer))
    again = task.load_data(ctx)
    assert torch.equal(again.train[0], data.train[0])


def test_bundled_encoder_builds_offline_and_classifies(imdb_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("METACORE_CACHE_DIR", str(tmp_path / "cache"))
    task, ctx = _ctx(imdb_dir, train_size=8, val_size=4, test_size=4, max_length=16)
    data = task.load_data(ctx)
    model = task.build_model(data, ctx)
    assert model.encoder.config.num_hidden_layers == 1 and model.encoder.config.hidden_size == 384
    logits = model(data.train[0][:3])
    assert logits.shape == (3, 2)
    task.apply_model_hparam(model, "dropout", 0.3)
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    opt = task.build_optimizer(model, {**task.hparam_space().defaults(), "beta1": 0.8}, ctx)
    assert opt.param_groups[0]["betas"][0] == 0.8 and opt.param_groups[0]["lr"] == 2e-5
    # padding is masked: dropping the trailing pad tokens does not change the logits
    model.eval()
    ids = torch.tensor([[101, 2307, 3185, 102] + [0] * 12])  # [CLS] great movie [SEP] + padding
    short = ids[:, :4]
    with torch.no_grad():
        assert short.shape[1] < ids.shape[1]
        torch.testing.assert_close(model(ids), model(short), atol=1e-4, rtol=1e-4)


def test_full_model_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    with pytest.raises(MetacoreError, match="--preset small"):
        imdb.load_encoder("bert-base-uncased", "bert-base-uncased")


def test_no_local_data_offline_names_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task, ctx = _ctx(tmp_path)
    with pytest.raises(DataError, match="--data-dir"):
        task.load_data(ctx)


def test_hub_code_path_on_local_files_of_the_hub_format(imdb_dir, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("METACORE_CACHE_DIR", str(tmp_path / "cache"))
    root = imdb_dir / "imdb"

    def fake_hub(task, hub_id, expected, **kw):
        assert hub_id == "stanfordnlp/imdb"
        return datasets.load_dataset("parquet", data_files={"train": str(root / "train.parquet"),
                                                            "test": str(root / "test.parquet")},
                                     cache_dir=str(tmp_path / "hf"))

    monkeypatch.setattr(imdb.dl, "load_hub_dataset", fake_hub)
    task, ctx = _ctx(None, train_size=10, val_size=4, test_size=6)
    local = _ctx(imdb_dir, train_size=10, val_size=4, test_size=6)[0].load_data(_ctx(imdb_dir, train_size=10,
                                                                                      val_size=4, test_size=6)[1])
    data = task.load_data(ctx)
    assert data.info["data.source"] == "hub stanfordnlp/imdb"
    assert torch.equal(data.train[0], local.train[0]) and torch.equal(data.test[1], local.test[1])


def test_seed_defaults_baseline_and_warmup_reach_the_schedule():
    from metacore.app.runner import RunRequest, plan_run

    task = imdb.ImdbTask()
    hp = task.hparam_space().defaults()
    assert hp["lr"] == 2e-5 and hp["batch_size"] == 32
    specs = task.option_specs()
    assert specs["max_length"].default == 128 and specs["warmup_steps"].default == 1000
    assert specs["model"].default == "bert-base-uncased"
    assert task.default_baseline == "linear-warmup"
    plan = plan_run(RunRequest(task="imdb", controller="static", baseline="linear-warmup", preset="full"))
    assert plan.roles[1][3]["warmup_steps"] == 1000
    plan = plan_run(RunRequest(task="imdb", controller="linear-warmup", baseline=None, preset="small",
                               controller_sets={"warmup_steps": "7"}))
    assert plan.roles[0][3]["warmup_steps"] == 7  # the user's --controller-set wins


@pytest.mark.slow
def test_cli_smoke_on_real_data_with_the_task_baseline(cli, data_dir):
    res = cli("run", "--task", "imdb", "--controller", "static", "--preset", "smoke", "--steps", "4",
              "--data-dir", str(data_dir), "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr
    runs = json.loads(res.stdout)["runs"]
    assert [(r["role"], r["controller"]) for r in runs] == [("controller", "static"), ("baseline", "linear-warmup")]
    for run in runs:
        assert 0.0 <= run["final"]["test/accuracy"] <= 1.0 and "test/f1_macro" in run["final"]
    assert runs[1]["hparams_final"]["lr"] < runs[0]["hparams_final"]["lr"]  # the schedule moved the baseline's lr
