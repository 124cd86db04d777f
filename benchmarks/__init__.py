"""adapterfast benchmarks: the adapter op against eager PyTorch, torch.compile and AdapterHub.

    python -m benchmarks --device cpu --quick      # op benchmarks, rows appended to benchmarks/results/
    python -m benchmarks.table                      # markdown tables (and the CPU speed targets) for the README
    python -m benchmarks.plot                       # PNG charts next to the results
    python -m benchmarks.e2e --device cpu --quick   # one training step of a small encoder, tokens/s
    bash benchmarks/gpu_check.sh                    # the whole GPU check, on a CUDA machine

Modules: ``providers`` (what is measured), ``timing`` and ``memory`` (how), ``shapes`` (which
shapes), ``machine`` (what is recorded with each row), ``results`` (JSON-lines rows), ``run`` (the
op benchmark), ``e2e``, ``table``, ``plot``. See benchmarks/README.md for the method.
"""
