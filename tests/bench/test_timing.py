"""kiln.bench.timing: best_of_each calls its sides round-robin and keeps each side's fastest time."""

from kiln.bench.timing import best_of_each


def test_best_of_each_alternates_sides_and_keeps_the_fastest():
    calls = []

    def side(name):
        def run():
            calls.append(name)
            return len(calls)

        return run

    best = best_of_each(3, {"a": side("a"), "b": side("b")})
    assert calls == ["a", "b", "a", "b", "a", "b"]  # a slow phase of the machine lands on both sides
    assert set(best) == {"a", "b"}
    assert best["a"][1] == 5 and best["b"][1] == 6  # the last call's result
    assert all(seconds >= 0 for seconds, _ in best.values())
