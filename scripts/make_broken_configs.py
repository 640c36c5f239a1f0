#!/usr/bin/env python3
"""Writes the configs/broken cases of the hardening issue (#22): each one a small edit of a smoke
config, its first line the text a dry run must print (checked by xtask/tests/runs.rs).

Run from the repository root: python3 scripts/make_broken_configs.py
"""
from pathlib import Path

MLP = Path("configs/smoke/mlp.toml").read_text().split("\n", 1)[1]  # without its comment line
LENET_INT8 = Path("configs/smoke/lenet_int8.toml").read_text()
LENET_INT8 = LENET_INT8[LENET_INT8.index("name ="):]

# (file, what it shows, expected text, the config)
CASES = [
    ("limit_hidden_huge", "a hidden layer of 10^9 units (784 × 10^9 weights)", "key `model`: mlp-1000000000 (7.840e11 parameters",
     MLP.replace("hidden = [32]", "hidden = [1000000000]")),
    ("limit_depth_huge", "a valid 6n+2 depth of six million", "key `model`: resnet6000002 (9.677e10 parameters",
     MLP.replace('kind = "mlp"\nhidden = [32]', 'kind = "cifar_resnet"\ndepth = 6000002')),
    ("limit_epochs_huge", "10^9 epochs", "the run would take about",
     MLP.replace("epochs = 2", "epochs = 1000000000")),
    ("limit_latency_batch_huge", "a latency batch of 10^10 images", "key `latency.batch_sizes`: measuring latency at batch 10000000000 needs about",
     MLP.replace("batch_sizes = [1, 8]", "batch_sizes = [1, 10000000000]")),
    ("limit_agp_updates", "more AGP updates than fine-tuning steps", "prune_schedule.updates`: 4000000000 sparsity updates, but the fine-tuning has",
     MLP.replace('[[stages]]\nkind = "evaluate"',
                 '[[stages]]\nkind = "prune"\nsparsity = 0.5\nepochs = 1\noptimizer = { kind = "adam", lr = 0.001 }\n'
                 'prune_schedule = { kind = "agp", updates = 4000000000 }')),
    ("name_too_long", "a run name of 300 characters", "key `name`: 300 characters",
     MLP.replace('name = "smoke_mlp"', 'name = "' + "n" * 300 + '"')),
    ("model_key_of_no_use", "`width` on LeNet-5, which has none", 'key `model.width`: kind = "lenet5" has no setting `width`',
     MLP.replace('kind = "mlp"\nhidden = [32]', 'kind = "lenet5"\nwidth = 2')),
    ("weight_decay_nan", "a NaN weight decay", "optimizer.weight_decay`: NaN is not allowed",
     MLP.replace('lr = 0.003 }', 'lr = 0.003, weight_decay = nan }')),
    ("lr_infinite", "an infinite learning rate", "optimizer.lr`: inf is not allowed",
     MLP.replace('lr = 0.003 }', 'lr = inf }')),
    ("epochs_date", "a date where an integer belongs", "key `stages[0].epochs`: a date-time (1979-05-27) is not a valid value",
     MLP.replace("epochs = 2", "epochs = 1979-05-27")),
    ("data_array_of_tables", "`[[data]]` instead of `[data]`", "key `data`: expected one table `[data]`, got an array of tables",
     MLP.replace("[data]", "[[data]]")),
    ("optimizer_positional", "a table given as a positional array", "optimizer`: expected a table",
     MLP.replace('optimizer = { kind = "adam", lr = 0.003 }', 'optimizer = ["adam", 0.003]')),
    ("quantize_override_matches_nothing", "a quantize override naming no layer", 'overrides[0].pattern`: overrides[0].pattern `conv9` matches no conv or linear layer',
     LENET_INT8.replace('pattern = "fc3"', 'pattern = "conv9"')),
    ("qat_override_matches_nothing", "a qat override naming no layer", 'overrides[0].pattern`: overrides[0].pattern `fc9` matches no conv or linear layer',
     MLP.replace('[[stages]]\nkind = "evaluate"',
                 '[[stages]]\nkind = "qat"\nepochs = 1\nbatch_size = 50\noptimizer = { kind = "adam", lr = 0.001 }\n'
                 'overrides = [{ pattern = "fc9", weight_bits = 4 }]')),
    ("quantize_untrained", "quantizing a model no stage trained", "quantizing calibrates the ranges of a trained model, but no stage before it trains `mlp-32`",
     MLP.replace('[[stages]]\nkind = "train"\nepochs = 2\nbatch_size = 50\noptimizer = { kind = "adam", lr = 0.003 }\n',
                 '[[stages]]\nkind = "quantize"\n')),
    ("qat_untrained", "QAT on a model no stage trained", "quantization-aware training starts from a trained model",
     MLP.replace('kind = "train"', 'kind = "qat"')),
    ("prune_round_to_huge", "channels kept in multiples larger than any layer", "round_to`: every group keeps a multiple of 1000000 channels",
     MLP.replace('[[stages]]\nkind = "evaluate"',
                 '[[stages]]\nkind = "prune"\ngranularity = "channels"\nsparsity = 0.5\nround_to = 1000000')),
    ("data_classes_one", "a class count of one", "key `data.classes`: a classifier needs at least 2 classes",
     MLP.replace("validation_fraction = 0.2", "validation_fraction = 0.2\nclasses = 1")),
]

out = Path("configs/broken")
for name, what, expect, text in CASES:
    assert text.count("\n") > 5, name
    (out / f"{name}.toml").write_text(f"# expect: {expect}\n# {what}\n{text}")
print(f"{len(CASES)} configs written to {out}")
