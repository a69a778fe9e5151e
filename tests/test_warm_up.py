"""The warm-up of new engines (workers/warm_up.py): which engines are paired, and the
requests they get, against stand-in engines on real sockets (tests/fake_engines.py)."""

from __future__ import annotations

from contextlib import ExitStack

from tests.fake_engines import FakeEngine, serving
from workers.warm_up import warm_up, warm_up_pairs


def _info(name: str, role: str, headless: bool = False) -> dict[str, object]:
    return {"name": name, "role": role, "host": "127.0.0.1", "port": 1, "headless": headless}


def _names(pairs: list[tuple[dict[str, object], ...]]) -> list[tuple[str, ...]]:
    return [tuple(str(engine["name"]) for engine in pair) for pair in pairs]  # type: ignore[misc]


def test_every_new_engine_is_in_one_pair() -> None:
    p0, p1, d0, d1, d2 = (_info("p0", "prefill"), _info("p1", "prefill"), _info("d0", "decode"), _info("d1", "decode"),
                          _info("d2", "decode"))  # fmt: skip
    assert _names(warm_up_pairs([p0, d0], [])) == [("p0", "d0")]  # a deploy's 1P1D
    assert _names(warm_up_pairs([p0, p1, d0], [])) == [("p0", "d0"), ("p1", "d0")]
    assert _names(warm_up_pairs([d1, d2], [p0, p1, d0])) == [("p0", "d1"), ("p1", "d2")]  # scale-out: running partners
    assert _names(warm_up_pairs([p1], [p0, d0, d1])) == [("p1", "d0")]
    assert _names(warm_up_pairs([_info("c0", "colocated"), _info("c1", "colocated")], [])) == [("c0",), ("c1",)]
    assert warm_up_pairs([d1], []) == []  # no prefill engine anywhere: nothing to hand over from
    assert warm_up_pairs([_info("p2", "prefill", headless=True)], [d0]) == []  # a DP group's rank serves nothing itself


def test_each_pair_hands_one_salted_prompt_over_and_failures_are_reported() -> None:
    engines = [FakeEngine("p0", "prefill"), FakeEngine("p1", "prefill"), FakeEngine("d0", "decode"),
               FakeEngine("c0", "colocated", fail_status=503)]  # fmt: skip
    with ExitStack() as stack:
        for engine in engines:
            stack.enter_context(serving(engine.app(), engine.port))
        infos = [engine.info for engine in engines]
        result = warm_up(infos, [], "m", tokens=300, api_key="k")
    p0, p1, d0, c0 = engines
    assert (p0.counts.prefill_legs, p1.counts.prefill_legs) == (1, 1)
    assert d0.counts.decode_legs == 2 and d0.counts.handed_over_by == {"p0": 1, "p1": 1}  # what each prefill answered
    sent = [r["body"] for e in engines for r in e.received]
    assert all(len(body["prompt"]) == 300 and str(body["cache_salt"]).startswith("warm-up-") for body in sent)
    assert len({body["cache_salt"] for body in sent}) == 3  # one salt per pair: c0, p0 -> d0, p1 -> d0
    assert {r["authorization"] for e in engines for r in e.received} == {"Bearer k"}
    assert set(result.engines) == {"p0", "p1", "d0"}
    assert len(result.failed) == 1 and result.failed[0].startswith("c0: HTTP 503")
    assert warm_up(infos, [], "m", tokens=0) == warm_up([], [], "m", tokens=300)  # nothing to do: nothing sent


def test_the_prompt_fits_the_engines_max_model_len() -> None:
    prefill, decode = FakeEngine("p0", "prefill", max_model_len=4096), FakeEngine("d0", "decode", max_model_len=202)
    with serving(prefill.app(), prefill.port), serving(decode.app(), decode.port):
        result = warm_up([prefill.info, decode.info], [], "m", tokens=320)
    assert result.failed == () and result.engines == ("p0", "d0")
    assert [len(r["body"]["prompt"]) for r in (*prefill.received, *decode.received)] == [200, 200]  # 202 less 2 to generate
