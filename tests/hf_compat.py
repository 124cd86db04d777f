"""transformers 4.x / 5.x names the HF tests need, so that each line runs without deprecation warnings
(transformers 5 renamed gradient checkpointing to activation checkpointing; the old names warn)."""
import dataclasses

import transformers


def checkpointing_enable(model, **kwargs):
    if hasattr(model, "activation_checkpointing_enable"):
        return model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    return model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_checkpointing(model) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def checkpointing_argument() -> str:
    """The ``TrainingArguments`` field that turns checkpointing on."""
    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
