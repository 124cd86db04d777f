"""The README example, offline: a small random BERT learns a synthetic task with adapterfast adapters
through PEFT and the transformers Trainer; the saved adapter reloads in a fresh process.

Task: sequences of random tokens; the label says whether token 7 occurs. The base model is
random (initializer_range 0.2, so its frozen attention actually mixes tokens) and frozen; only
the adapters and the classifier learn. The learning rate is 10x the README's 5e-4 because the
model is tiny and the budget is a few seconds of CPU.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from helpers import fp16_unsupported_reason

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

VOCAB, LENGTH, MARK, CLS = 100, 12, 7, 2


class MarkerTask(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(10, VOCAB, (n, LENGTH), generator=g)
        self.x[:, 0] = CLS
        self.y = torch.arange(n) % 2
        where = torch.randint(1, LENGTH, (n,), generator=g)
        self.x[self.y == 1, where[self.y == 1]] = MARK

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": self.y[i]}


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


_RELOAD = textwrap.dedent("""
    import sys, torch
    import adapterfast
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(sys.argv[1]), sys.argv[2])
    with torch.no_grad():
        torch.save(model.eval()(input_ids=torch.load(sys.argv[3])).logits, sys.argv[4])
""")


@pytest.mark.slow
def test_readme_example_trains_saves_and_reloads(tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig, Trainer, TrainingArguments
    from peft import TaskType, get_peft_model

    from adapterfast import AdapterConfig

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2, initializer_range=0.2)
    base = AutoModelForSequenceClassification.from_config(config)
    base.save_pretrained(tmp_path / "base")  # stands in for a downloaded checkpoint

    # --- the README example, with only the model source and the sizes changed ---
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    adapter_config = AdapterConfig(task_type=TaskType.SEQ_CLS, r=16, alpha=16, dropout=0.1)
    model = get_peft_model(model, adapter_config)
    model.print_trainable_parameters()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        learning_rate=5e-3,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        num_train_epochs=4,
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="epoch",
        fp16=fp16_unsupported_reason() is None,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=MarkerTask(1024, seed=1),
                      eval_dataset=MarkerTask(256, seed=2), compute_metrics=accuracy)
    trainer.train()
    # ---------------------------------------------------------------------------

    history = [h["eval_accuracy"] for h in trainer.state.log_history if "eval_accuracy" in h]
    print("eval accuracy per epoch:", history)
    assert len(history) == 4, history  # one evaluation per epoch
    assert history[-1] >= 0.9, history

    model.save_pretrained(tmp_path / "adapter")
    files = sorted(os.listdir(tmp_path / "adapter"))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors") < 64 * 1024  # adapters + head only

    x = MarkerTask(64, seed=3).x
    model = model.cpu().eval()  # the fresh process runs on CPU
    with torch.no_grad():
        expected = model(input_ids=x).logits
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path / "base"), str(tmp_path / "adapter"),
                             str(tmp_path / "x.pt"), str(tmp_path / "logits.pt")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=0)
