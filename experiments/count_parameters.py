"""Parameter counts of the VT-ADL "paper" variant as built, without materialising weights.

    python experiments/count_parameters.py [--json PATH]

``jax.eval_shape`` of the model's ``init`` gives the parameter shapes only, so the
114M-parameter model is counted in a second. Two builds: the "paper" variant as
configured (linear projection with a bias, the paper's K=150 MDN head) and the
code-equivalent overrides (projection="routing", mdn_head="vtadl_code",
num_components=10, attn_scale="model") that reproduce the official code's layers.
BatchNorm running statistics are not parameters and are not counted.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # first, before jax loads: huge-page malloc (vtadl_jax.hostmem)
    from vtadl_jax.hostmem import reexec_with_hugepage_malloc

    reexec_with_hugepage_malloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vtadl_jax.models.variants import get_variant  # noqa: E402
from vtadl_jax.records import write_json_atomic  # noqa: E402
from vtadl_jax.train.state import count_params  # noqa: E402

BUILDS = {
    "paper": {},
    "paper, code-equivalent": dict(projection="routing", mdn_head="vtadl_code",
                                   num_components=10, attn_scale="model"),
}
PARTS = (("encoder", "encoder"), ("project", "projection / capsule"), ("dec", "decoder"))


def count(overrides: dict) -> dict[str, int]:
    model = get_variant("paper", **overrides)
    keys = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}
    shapes = jax.eval_shape(lambda: model.init(
        keys, jnp.zeros((1, *model.image_size, model.channels)), train=False))["params"]
    unknown = set(shapes) - {k for k, _ in PARTS} - {"mdn"}
    if unknown:
        raise ValueError(f"unexpected parameter groups {sorted(unknown)}")
    row = {label: count_params(shapes[key]) for key, label in PARTS}
    row["autoencoder"] = sum(row.values())
    row["MDN head"] = count_params(shapes["mdn"])
    row["total"] = count_params(shapes)
    row["K"] = model.num_components
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = {name: count(ov) for name, ov in BUILDS.items()}
    names = list(rows)
    print("| part | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for part in rows[names[0]]:
        print(f"| {part} | " + " | ".join(f"{rows[n][part]:,}" for n in names) + " |")
    if args.json:
        write_json_atomic(rows, args.json)


if __name__ == "__main__":
    main()
