"""``dsn-robust bench``: throughput of real skipping vs masked execution, open network and static twins."""
from __future__ import annotations

import argparse
import json

from robustness.bench.skipping import format_table, run_benchmark
from robustness.core.runtime import DEVICE_CHOICES, resolve_device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure the wall-clock saving of real layer skipping (prints JSON + table)",
                       description="Time dsn hard (sub-batch), dsn masked, dsn open, dual and resnet on one batch. "
                                   "Target: time saved vs masked >= 80%% of MACs saved.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", metavar="RUN_DIR", help="use a trained dsn run's gates (hard mode)")
    src.add_argument("--skip", type=float, default=0.5,
                     help="without --run: force gates to skip this fraction at random per sample (default 0.5)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant; the median is reported")
    p.add_argument("--depth-n", type=int, default=3, help="without --run: blocks per stage (ResNet-6n+2)")
    p.add_argument("--width", type=int, default=16, help="without --run: channels of the first stage")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--no-attack-overhead", action="store_true",
                   help="skip timing the attack runner against direct torchattacks PGD")
    p.add_argument("--json-only", action="store_true", help="print only the JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    result = run_benchmark(run=args.run, skip=None if args.run else args.skip, batch_size=args.batch_size,
                           repeats=args.repeats, depth_n=args.depth_n, width=args.width,
                           image_size=args.image_size, device=resolve_device(args.device),
                           attack_overhead=not args.no_attack_overhead)
    print(json.dumps(result.to_dict(), indent=2))
    if not args.json_only:
        print(format_table(result))
    return 0
