"""Method strings: one parser for every `key=value` a user writes (docs/formats.md, "Method
strings"), on the TOML value rules of config.py's `--set`:

    value         TOML: 20 -> 20, 1e-3 -> 0.001, true -> True, "a b" -> "a b", [0, 1] -> [0, 1];
                  `none` -> None (TOML has no null; a loss option such as clamp takes it);
                  anything else TOML cannot read is a bare string: sba -> "sba"
    method        LOSS or LOSS[key=value,key=value]: "tdpo1[generator=sba,clamp=20]"
    perf row      METHOD+switch=value+...: "dpo+prefix_sharing=false" (train.* switches)
    loss option   LOSS.OPTION=VALUE: "tbpo-a.kl_estimator=k3" (`tokenratio bench`)

Used by the losses' users (study, bench, perf) and the command line; a method's loss and options
are checked against the registry when parsed, so a typo fails before anything trains.
"""

import tomllib


def parse_value(text: str):
    """One value on the rules above."""
    text = text.strip()
    if text.lower() == "none":
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string: model.name_or_path=HuggingFaceTB/SmolLM2-135M


def parse_assignment(text: str, what: str, shape: str) -> tuple[str, object]:
    """`key=value` -> (key, value); `what` and `shape` name the thing in the error."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{what} {text!r} must look like {shape}")
    return key.strip(), parse_value(raw)


def parse_method(spec: str) -> tuple[str, dict]:
    """ "tdpo1[generator=sba,clamp=20]" -> ("tdpo1", {"generator": "sba", "clamp": 20}), the loss
    and its options checked against `losses.LOSSES` (an unknown one lists the valid ones)."""
    from tokenratio.losses import LOSSES

    name, _, rest = spec.strip().partition("[")
    options = {}
    if rest:
        if not rest.endswith("]"):
            raise ValueError(f"method {spec!r}: write options as LOSS[key=value,key=value]")
        for item in filter(None, rest[:-1].split(",")):
            key, value = parse_assignment(item, f"method {spec!r}: option", "key=value")
            options[key] = value
    LOSSES[name].needs(options)  # unknown names or options fail here
    return name, options


def parse_row(row: str) -> tuple[str, dict]:
    """ "dpo+prefix_sharing=false+ref_cache" -> ("dpo", {"prefix_sharing": False, "ref_cache":
    True}): a perf row's method (or "trl") and its train switches (a bare switch is true)."""
    method, *switches = row.split("+")
    values = {}
    for switch in switches:
        key, value = parse_assignment(
            switch if "=" in switch else f"{switch}=true", f"row {row!r}: switch", "key=value"
        )
        values[key] = value
    return method, values


def parse_loss_option(text: str) -> tuple[str, str, object]:
    """ "tbpo-a.kl_estimator=k3" -> ("tbpo-a", "kl_estimator", "k3")."""
    key, value = parse_assignment(text, "--loss-option", "LOSS.OPTION=VALUE")
    loss, dot, option = key.rpartition(".")
    if not (dot and loss and option):
        raise ValueError(f"--loss-option {text!r} must look like LOSS.OPTION=VALUE")
    return loss, option, value
