"""Data parallel training with adapters: DDP, FSDP2 and the Hugging Face Trainer, two CPU processes on gloo.

Every check runs in two processes talking over 127.0.0.1 only (a free port, ``GLOO_SOCKET_IFNAME=lo``)
with a deadline, so a hang fails the test instead of stalling CI. Each worker also computes the
single-process result on the whole batch itself, and the comparisons run inside the workers (an
assertion there fails the test with the worker's traceback).

- DDP: the base is frozen and only the adapters train, without ``find_unused_parameters``; gradients
  equal one process on the whole batch, step after step; ``torch.compile`` of the DDP model too.
- FSDP2 (``fully_shard``) on CPU/gloo with a frozen base and trainable adapters, for the wrappings
  that mix frozen and trainable parameters in one group (root only, per block, per adapter) and for
  ``ignored_params`` holding the frozen base: gradients and trained weights equal one process; and
  per block with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, within bf16 accuracy.
  ``fully_shard`` on an Adapter's own ``down``/``up`` Linear layers cannot work (the Adapter reads their
  weights without calling them) and gets a TypeError that says which module to shard instead.
- ``transformers.Trainer`` under ``accelerate launch`` (2 processes, CPU, gloo), on a tiny random BERT
  with ``adapterfast.Adapter`` modules inserted by hand and the base frozen.
"""
from __future__ import annotations

import datetime
import faulthandler
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import adapterfast
from helpers import rel_err
from training_models import make_model

pytestmark = pytest.mark.slow

WORLD = 2
DEADLINE_S = 240
HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, *args, deadline_s=DEADLINE_S):
    """Runs ``worker(rank, port, *args)`` in WORLD spawned processes; kills them at the deadline."""
    context = mp.start_processes(worker, args=(_free_port(), *args), nprocs=WORLD, join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    while not context.join(timeout=max(1.0, end - time.monotonic())):
        if time.monotonic() >= end:
            alive = [process for process in context.processes if process.is_alive()]
            for process in alive:
                os.kill(process.pid, signal.SIGUSR1)  # the workers dump their stacks on it
            time.sleep(3)
            for process in alive:
                process.kill()
            pytest.fail(f"{worker.__name__} did not finish within {deadline_s}s")


def _init(rank, port):
    faulthandler.enable(all_threads=True)  # a fatal signal (SIGABRT, SIGSEGV) prints the Python stacks
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=90))


def _finish():
    """Leaves the process group together, then exits at once. Letting the interpreter finalise with
    gloo's worker threads around aborted now and then on torch 2.13 ("terminate called without an
    active exception", from a thread with no Python frame), after every check had passed."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _batches(steps, n=8, seq=5, d=16):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, seq, d, generator=gen), torch.randn(n, seq, 2, generator=gen)) for _ in range(steps)]


def _local(t, rank):
    return t.chunk(WORLD)[rank]


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------- DDP

def _ddp_worker(rank, port, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, port)
    for backend in ("auto", "reference"):
        with adapterfast.use_backend(backend):
            # frozen base, trainable adapters, no find_unused_parameters
            model, single = make_model(), make_model()
            ddp = DDP(model)
            opt = torch.optim.SGD(_trainable(model).values(), lr=0.1)
            opt_single = torch.optim.SGD(_trainable(single).values(), lr=0.1)
            for x, target in _batches(3):
                opt.zero_grad()
                F.mse_loss(ddp(_local(x, rank)), _local(target, rank)).backward()
                opt_single.zero_grad()
                F.mse_loss(single(x), target).backward()
                for (name, p), q in zip(_trainable(model).items(), _trainable(single).values()):
                    assert rel_err(p.grad, q.grad) < 1e-5, (backend, name)
                assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
                opt.step()
                opt_single.step()
            for (name, p), q in zip(model.named_parameters(), single.parameters()):
                assert rel_err(p, q) < 1e-5, (backend, name)

            # torch.compile of the DDP model (DDPOptimizer splits the graph at bucket boundaries)
            torch._dynamo.reset()
            model, single = make_model(), make_model()
            compiled = torch.compile(DDP(model), backend="aot_eager")
            x, target = _batches(1)[0]
            F.mse_loss(compiled(_local(x, rank)), _local(target, rank)).backward()
            F.mse_loss(single(x), target).backward()
            for (name, p), q in zip(_trainable(model).items(), _trainable(single).values()):
                assert rel_err(p.grad, q.grad) < 1e-5, ("compiled", backend, name)

            # dropout > 0: trains, ranks stay in sync (DDP's all-reduce), nothing unused
            model = make_model(dropout=0.2)
            ddp = DDP(model)
            opt = torch.optim.AdamW(_trainable(model).values(), lr=1e-2)
            torch.manual_seed(100 + rank)  # different masks on each rank
            for x, target in _batches(3):
                opt.zero_grad()
                F.mse_loss(ddp(_local(x, rank)), _local(target, rank)).backward()
                opt.step()
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(WORLD)]
            dist.all_gather(gathered, flat)
            assert torch.equal(gathered[0], gathered[1])
            assert not torch.equal(flat, torch.cat([p.flatten() for p in make_model(dropout=0.2).parameters()]))
    if rank == 0:
        Path(tmp, "ddp_ok").touch()
    _finish()


def test_ddp_frozen_base_matches_single_process(tmp_path):
    _spawn(_ddp_worker, str(tmp_path))
    assert (tmp_path / "ddp_ok").exists()


# ------------------------------------------------------------------------------------------- FSDP2

def _wrap(model, how):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = list(model)[:-1]
    if how == "per_block_bf16":  # bf16 compute with fp32 sharded master weights and fp32 gradient reduction
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    if how == "per_block":
        for block in blocks:
            fully_shard(block)
    elif how == "per_adapter":
        for block in blocks:
            fully_shard(block.adapter)
            fully_shard(block.parallel)
    if how == "ignore_frozen":
        fully_shard(model, ignored_params={p for p in model.parameters() if not p.requires_grad})
    else:
        fully_shard(model)
    return model


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _fsdp_worker(rank, port, tmp, wrappings):
    _init(rank, port)
    for backend in ("auto", "reference"):
        with adapterfast.use_backend(backend):
            for how in wrappings:
                # bf16: SGD, since Adam's first steps (about lr * sign(g)) turn bf16 noise in near-zero
                # gradient entries into weight differences of 2 * lr
                bf16 = how.endswith("bf16")
                tol = 3e-2 if bf16 else 1e-5
                optimizer = (lambda ps: torch.optim.SGD(ps, lr=0.1)) if bf16 else (lambda ps: torch.optim.AdamW(ps, lr=1e-2))
                model, single = _wrap(make_model(dropout=0.0), how), make_model(dropout=0.0)
                opt = optimizer(_trainable(model).values())
                opt_single = optimizer(_trainable(single).values())
                for x, target in _batches(3):
                    opt.zero_grad()
                    # FSDP2 averages gradients over ranks: local means average to the global mean
                    F.mse_loss(model(_local(x, rank)), _local(target, rank)).backward()
                    opt_single.zero_grad()
                    F.mse_loss(single(x), target).backward()
                    for (name, p), q in zip(model.named_parameters(), single.parameters()):
                        assert (p.grad is None) == (not p.requires_grad), (how, name)
                        if p.grad is not None:
                            assert p.grad.dtype == torch.float32
                            assert rel_err(_full(p.grad), q.grad) < tol, (backend, how, name, rel_err(_full(p.grad), q.grad))
                    opt.step()
                    opt_single.step()
                for (name, p), q in zip(model.named_parameters(), single.parameters()):
                    assert rel_err(_full(p.detach()), q) < tol, (backend, how, name)

    # the wrapping that cannot work: the Adapter reads its down/up nn.Linear weights without calling
    # those layers, so fully_shard on them never gathers the weights; the error says what to do
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for block in list(model)[:-1]:
        fully_shard(block.adapter.down)
        fully_shard(block.adapter.up)
    fully_shard(model)
    with pytest.raises(TypeError, match="fully_shard the Adapter or a module above it"):
        model(_local(_batches(1)[0][0], rank))
    if rank == 0:
        Path(tmp, "fsdp_ok").touch()
    _finish()


def test_fsdp2_frozen_base_matches_single_process(tmp_path):
    _spawn(_fsdp_worker, str(tmp_path), ("root", "per_block", "per_adapter", "ignore_frozen", "per_block_bf16"))
    assert (tmp_path / "fsdp_ok").exists()


# ------------------------------------------------------------------------------------- HF Trainer

def _end_tree(launch):
    """Ends a hung launcher and its workers (torchrun starts each worker in a session of its own, so
    they are found as descendants first): SIGUSR1, on which the script dumps every thread's stack,
    then SIGKILL. No orphan is left behind to hold the output pipe or a port."""
    import psutil  # a dependency of accelerate

    tree = [launch.pid] + [child.pid for child in psutil.Process(launch.pid).children(recursive=True)]
    for sig in (signal.SIGUSR1, signal.SIGKILL):
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(3)


def test_hf_trainer_accelerate_launch(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)
    # `--multi_gpu` selects accelerate's torchrun launcher; the script asks the Trainer for CPU/gloo
    # (`accelerate launch --cpu` with several processes expects mpirun instead).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
               str(HERE / "hf_trainer_script.py"), str(tmp_path)]
    launch = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = launch.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        _end_tree(launch)
        output, _ = launch.communicate(timeout=30)
        pytest.fail(f"accelerate launch did not finish within {DEADLINE_S}s:\n{output[-8000:]}")
    assert launch.returncode == 0, output[-8000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for result in results:
        assert result["world_size"] == WORLD
        assert result["wrapped"] == "DistributedDataParallel"
        assert result["steps"] == 4 and all(map(lambda v: v == v, result["losses"]))  # no NaN
        assert result["adapters_changed"] and not result["frozen_changed"]
    assert results[0]["adapter_checksum"] == results[1]["adapter_checksum"]  # ranks in sync
