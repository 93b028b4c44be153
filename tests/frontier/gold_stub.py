"""Users' gold rewards for tests/frontier: `python:gold_stub:FUNCTION`."""


def length(prompts, responses):
    return [float(len(r)) for r in responses]


def nan_on_second(prompts, responses):
    return [float("nan") if i == 1 else 0.0 for i in range(len(responses))]


def one_short(prompts, responses):
    return [0.0] * (len(responses) - 1)


def raises(prompts, responses):
    raise RuntimeError("the scorer's server is down")


not_callable = 3
