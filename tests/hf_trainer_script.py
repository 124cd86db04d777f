"""Run by ``test_distributed.py`` under ``accelerate launch``: a few steps of adapter training with the
Hugging Face Trainer on a tiny random BERT (no download), on CPU with gloo.

``adapterfast.Adapter`` modules are inserted by hand after each layer's output projection
(Houlsby/Pfeiffer placement); the base is frozen. Each rank writes ``rank{N}.json`` into the output
directory: world size, how the Trainer wrapped the model, the logged losses, whether the adapters
changed and the frozen weights did not, and a checksum of the adapter weights.
"""
import faulthandler
import json
import os
import signal
import sys

faulthandler.enable(all_threads=True)  # a fatal signal (SIGABRT, SIGSEGV) prints the Python stacks
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test sends it on a hang: dump every stack

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

import adapterfast  # noqa: E402


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=8, vocab=64):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=gen)
        self.labels = torch.randint(0, 2, (n,), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def main(out):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
    model = BertForSequenceClassification(config)
    model.requires_grad_(False)
    for layer in model.bert.encoder.layer:
        layer.output.dense = nn.Sequential(layer.output.dense, adapterfast.Adapter(32, 8, dropout=0.1))
    adapters = {n: p for n, p in model.named_parameters() if ".1.down." in n or ".1.up." in n}
    for p in adapters.values():
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2, logging_steps=1,
        use_cpu=True, ddp_backend="gloo", ddp_find_unused_parameters=False, report_to=[],
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens())
    trainer.train()

    changed = {n: not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()}
    result = {
        "world_size": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "steps": trainer.state.global_step,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "adapters_changed": len(adapters) == 4 and all(changed[n] for n in adapters),
        "frozen_changed": any(changed[n] for n in changed if n not in adapters),
        "adapter_checksum": [float(p.detach().double().sum()) for p in adapters.values()],
    }
    with open(os.path.join(out, f"rank{trainer.args.process_index}.json"), "w") as f:
        json.dump(result, f)
    # Leave the process group together, then exit at once, while the Trainer and its DDP model are
    # still alive: on torch 2.13 with gloo, freeing them after destroy_process_group() now and then hung
    # or aborted ("terminate called without an active exception") after training had finished.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
