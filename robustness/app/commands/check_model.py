"""``dsn-robust check-model FILE.py[:FUNCTION]``: is the adapted model the network its own code computes?

Before an attack is spent on a researcher's network, this builds it as ``attack --model-file`` does, runs
:func:`models.fidelity.check_model` on the first ``--n`` test images of ``--dataset`` and prints what the suite
takes the model to be (static, score-gated, general protocol), whether its adapted deployed forward reproduces its
own ``forward`` (prediction agreement, largest logit difference), whether it is random at test time, and its
measured per-sample MACs. Exit 0 when faithful (or when there is nothing to compare with), 2 when not.

``--weights`` is optional: an untrained model checks the adapter's code, but its gates may all be open, so a gate
the adapter leaves out can go unseen; check trained weights before attacking them.
"""
from __future__ import annotations

import argparse



def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-model")
    p.add_argument("model_file", metavar="FILE.py[:FUNCTION]",
                   help="FUNCTION (default build) of FILE.py, or an entry point of the group dsn_robustness.models")
    p.add_argument("--weights", metavar="W.pt", help="the module's state_dict (read with weights_only=True); "
                                                     "without it the freshly built module is checked")
    p.add_argument("--dataset", required=True, help="the dataset whose first test images the check runs on")
    p.add_argument("--data-root", dest="data_root", metavar="DIR", help="the dataset's folder")
    p.add_argument("--n", type=int, default=64, help="test images to compare on (default 64)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from models.fidelity import check_model
    from models.model_file import build_from_spec
    from robustness.app.commands.attack import dataset_options
    from robustness.core.config import MAX_COUNT, check_int
    from robustness.data import load_dataset

    n = check_int("--n", args.n, 1, MAX_COUNT)
    test = load_dataset(args.dataset, "test", root=args.data_root)
    model = build_from_spec(args.model_file, args.weights, derived=dataset_options(test.info)).eval()
    x = test.batch(slice(0, min(n, len(test))))[0]
    with torch.no_grad():
        model(x[:2])  # the first forward measures the costs
    check = check_model(model, x)
    for line in check.lines():
        print(line)
    if model.is_gated:
        with torch.no_grad():
            rates = model(x).path.mean(0)
        print("execution rate per gate: " + ", ".join(f"{g} {100 * float(r):.0f}%"
                                                      for g, r in zip(model.gate_names, rates)))
        if bool((rates == 1).all()):
            print("note: every gate ran for every image, so an adapter that leaves a gate out looks faithful here; "
                  "check the trained weights (--weights)")
    print(_costs_line(model))
    return 2 if check.faithful is False else 0


def _costs_line(model) -> str:
    costs = model.costs
    if not model.is_gated:
        return f"MACs per sample: {_macs(costs.full)} (measured with torch's flop counter)"
    saved = ", ".join(f"{name} {_macs(m)}" for name, m in zip(model.gate_names, costs.gated_blocks))
    return (f"MACs per sample (measured with torch's flop counter): {_macs(costs.full)} with every gate on, "
            f"{_macs(costs.always_on)} with every gate off; skipping saves: {saved}")


def _macs(value: float) -> str:
    return f"{value / 1e6:.4g} M"
