"""Integrations that put adapterfast adapters into real models (transformers, PEFT, AdapterHub)."""
