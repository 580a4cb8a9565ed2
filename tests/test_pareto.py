"""Issue 22: the Pareto front of accuracy against cost, on a small hand-made set."""

from metaqnn.pareto import comparable, pareto_front


def test_the_front_is_the_models_nothing_beats_in_both():
    points = [
        ("a", 0.90, 100.0),  # front: the cheapest
        ("b", 0.95, 300.0),  # front
        ("c", 0.93, 400.0),  # beaten by b (more accurate, cheaper)
        ("d", 0.97, 1000.0),  # front: the most accurate
        ("e", 0.90, 150.0),  # beaten by a (as accurate, cheaper)
        ("f", 0.95, 300.0),  # the same as b: both on the front
        ("g", 0.80, 100.0),  # beaten by a (as cheap, more accurate)
    ]
    assert pareto_front(points) == ["a", "b", "f", "d"]
    assert pareto_front([]) == []
    assert pareto_front([("x", 0.5, 1.0)]) == ["x"]


def test_latencies_of_two_machines_are_not_put_on_one_front():
    rows = [
        (1, 0.9, {"latency": {"forward_ms": 1.0, "device": "cpu: A"}}),
        (2, 0.95, {"latency": {"forward_ms": 0.1, "device": "gpu 0: B"}}),
        (3, 0.92, {"latency": {"forward_ms": 2.0, "device": "cpu: A"}}),
        (4, 0.99, {}),  # not timed
    ]
    points, note = comparable(rows, "latency")
    assert [p[0] for p in points] == [1, 3] and "1 on gpu 0: B" in note and "cpu: A" in note
    assert [p[0] for p in comparable(rows, "params")[0]] == []
