"""Staged training of DSN and its static twins, with checkpoints, exact resume on CPU and DDP under ``torchrun``.

The schedule (DESIGN.md, "The model"):

1. **warm-up** (``warmup_epochs``): every gate is open (forward mode ``open``); the network learns its features.
2. **gates on**: the gate function's training relaxation runs (``hardsig`` / ``ste`` / ``gumbel`` or any registered
   one); the budget and ranking terms of the loss are ramped in linearly over ``ramp_epochs`` (per iteration);
3. **slope annealing** (``hardsig`` only): the hard sigmoid's slope ``k`` starts at ``slope_start`` and grows by
   ``slope_growth`` per gated epoch up to ``slope_max`` (CVPR'18 DSN), so the relaxation approaches the hard gate.

Static models (``dual``, ``resnet``) train with the same loop; the gate terms are simply absent.

Optimisation: SGD with momentum, no weight decay on BatchNorm parameters, biases and gates; cosine or step decay
of the learning rate, applied per iteration (optionally after a linear learning-rate warm-up). On CUDA: AMP
(``torch.autocast`` + ``GradScaler``) and channels-last memory. On CPU: float32 and deterministic algorithms.

Randomness: one seed. Data order and augmentation come from ``torch.Generator`` objects seeded from
``(seed, epoch[, rank])``, so they need no saved state; the global torch generator (Gumbel noise, CUDA) is saved in
every checkpoint. On CPU a run that is killed and resumed therefore produces the same metrics, bit for bit, as one
that ran through.

Run directory (see ``robustness.core.rundir``): ``config.json`` (``TrainConfig``), ``metrics.csv`` (one row per
epoch), ``checkpoints/last.pt`` (every epoch, with everything needed to resume), ``checkpoints/best.pt`` (best test
fine accuracy; for gated models only epochs after the warm-up compete, so ``best`` is always a skipping network)
and ``train.done``.

The package, by job: ``config`` (TrainConfig), ``schedule`` (learning rate, slope, ramp, data order,
augmentation), ``optim`` (optimiser and LR scheduler), ``runtime`` (threads, determinism, AMP), ``metrics``
(evaluation and ``metrics.csv``), ``resume`` (run-directory state, saved training state), ``trainer`` (the loop).
"""
from models.training.config import SCHEDULES, TrainConfig
from models.training.metrics import METRIC_COLUMNS, evaluate, metrics_csv, read_metrics
from models.training.schedule import augment_batch, epoch_batches
from models.training.trainer import Callback, Trainer, TrainResult, train

__all__ = ["Callback", "METRIC_COLUMNS", "SCHEDULES", "TrainConfig", "TrainResult", "Trainer", "augment_batch",
           "epoch_batches", "evaluate", "metrics_csv", "read_metrics", "train"]
