"""The embedding layer: the default MiniLM encoder, the registry, and the worker that runs it off the loop."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import full_width, make_encoder_dir
from hashing_embedder import HashingEmbedder

from memos.embed import (
    DEFAULT_MODEL,
    EmbedderBusy,
    EmbedderClosed,
    EmbedderLoadError,
    EmbedderLoading,
    EmbedWorker,
    TransformersEncoder,
    Vectors,
    WorkerState,
    bundled_model_dir,
    load_embedder,
)
from memos.embed.base import Embedder, Threads

SENTENCES = [
    "Caroline went to the LGBTQ support group on 7 May 2023.",
    "Melanie painted a sunrise over the lake last year.",
    "ok",
    "The quarterly report shows revenue grew by 12% compared with the previous quarter, "
    "driven mostly by subscriptions in Europe and a new partnership with a logistics firm.",
    "Dogs are loyal.",
]


SAME_TEXT = 0.999
"""Cosine floor for one text embedded in different batches: float32 agrees to ~1e-6, bfloat16 to ~1e-4."""


@pytest.fixture(scope="session")
def minilm(embedder: Embedder) -> TransformersEncoder:
    """The bundled all-MiniLM-L6-v2, loaded once: reuse the harness's session embedder when it is that model."""
    if isinstance(embedder, TransformersEncoder) and embedder.name == DEFAULT_MODEL:
        return embedder
    return TransformersEncoder()


def cosine(a: Vectors, b: Vectors) -> float:
    return float(np.dot(a, b))


class GatedEmbedder:
    """A model-free embedder whose ``embed`` blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.inner = HashingEmbedder(16)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.name = "gated"
        self.dims = 16

    def embed(self, texts: Sequence[str]) -> Vectors:
        self.entered.set()
        assert self.gate.wait(10), "test never opened the gate"
        return self.inner.embed(texts)


async def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# -- import cost ----------------------------------------------------------------------------


def test_import_does_not_load_torch() -> None:
    code = (
        "import sys, memos.embed, memos.embed.worker, memos.embed.registry, memos.embed.transformers_encoder; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- the default encoder --------------------------------------------------------------------


def test_bundled_model_is_found_in_the_wheel() -> None:
    path = bundled_model_dir()
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()


def test_shape_dtype_and_unit_norm(minilm: TransformersEncoder) -> None:
    vectors = minilm.embed(SENTENCES)
    assert minilm.name == DEFAULT_MODEL
    assert minilm.dims == 384
    assert vectors.shape == (len(SENTENCES), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_empty_input(minilm: TransformersEncoder) -> None:
    vectors = minilm.embed([])
    assert vectors.shape == (0, 384)
    assert vectors.dtype == np.float32


def test_a_bare_string_is_refused(minilm: TransformersEncoder) -> None:
    with pytest.raises(TypeError, match="not a single str"):
        minilm.embed("hello")


def test_deterministic(minilm: TransformersEncoder) -> None:
    np.testing.assert_array_equal(minilm.embed(SENTENCES), minilm.embed(SENTENCES))


def test_order_is_kept_across_length_buckets(minilm: TransformersEncoder) -> None:
    # 40 texts of very different lengths in batches of 8: sorted into buckets, then put back in input order.
    rng = np.random.default_rng(7)
    words = ["memory", "agent", "paris", "sister", "bought", "books", "cooking", "painting", "music", "lake"]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 60, size=40)]
    minilm.batch_size = 8
    try:
        together = minilm.embed(texts)
    finally:
        minilm.batch_size = 64
    alone = minilm.embed([texts[i] for i in (0, 13, 22, 31, 39)])
    # Row i of the batch is text i: its best match among the texts embedded alone is itself.
    similarity = together[[0, 13, 22, 31, 39]] @ alone.T
    assert list(similarity.argmax(axis=1)) == [0, 1, 2, 3, 4]
    assert similarity.diagonal().min() > SAME_TEXT
    assert len(set(minilm.token_lengths(texts))) > 10


def test_batches_are_padded_to_a_multiple_of_tokens_and_vectors_do_not_change() -> None:
    """A batch's width is rounded up to ``pad_multiple`` (fewer distinct shapes); one text keeps its own
    length; the padding is masked, so every vector matches the unpadded pass."""
    encoder = TransformersEncoder()  # not warmed up: the eager model, whose inputs a hook can see
    encoder.pass_cost = 10**6  # one pass for all five texts: this test is about its width
    widths: list[tuple[int, int]] = []
    encoder._model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    lengths = encoder.token_lengths(SENTENCES)
    padded = encoder.embed(SENTENCES)
    assert widths and all(width % 16 == 0 for _, width in widths)
    widths.clear()
    encoder.embed(SENTENCES[:1])
    assert widths == [(1, lengths[0])]
    encoder.pad_multiple = 1
    widths.clear()
    exact = encoder.embed(SENTENCES)
    assert max(width for _, width in widths) == max(lengths)
    for a, b in zip(padded, exact, strict=True):
        assert cosine(a, b) >= SAME_TEXT
    # The passes run are the ones planned: the shapes the model sees match _buckets and _width.
    encoder.pass_cost, encoder.pad_multiple = 32, 16
    texts = SENTENCES * 3 + ["word " * 200]
    widths.clear()
    encoder.embed(texts)
    lengths = encoder.token_lengths(texts)
    planned = [(len(run), encoder._width(len(run), max(lengths[i] for i in run))) for run in encoder._buckets(lengths)]
    assert sorted(widths) == sorted(planned) and len(planned) > 1
    with pytest.raises(ValueError, match="pad_multiple"):
        TransformersEncoder(pad_multiple=0)


def _padded(encoder: TransformersEncoder, lengths: list[int], run: list[int]) -> int:
    """Tokens a pass over ``run`` computes: rows x width (a lone text unpadded, else up to ``pad_multiple``)."""
    longest = max(lengths[i] for i in run)
    if len(run) == 1:
        return longest
    return len(run) * min(-(-longest // encoder.pad_multiple) * encoder.pad_multiple, encoder.max_length)


def _grouping_cost(encoder: TransformersEncoder, lengths: list[int], runs: list[list[int]]) -> int:
    """What ``runs`` cost by the encoder's own account: ``pass_cost`` a pass, plus its padded tokens."""
    return sum(encoder.pass_cost + _padded(encoder, lengths, run) for run in runs)


def _fits(encoder: TransformersEncoder, lengths: list[int], run: list[int]) -> bool:
    return len(run) == 1 or (
        len(run) <= encoder.batch_size and _padded(encoder, lengths, run) <= encoder.max_batch_tokens
    )


@pytest.fixture
def planner(minilm: TransformersEncoder) -> Iterator[TransformersEncoder]:
    """The shared encoder with its grouping settings put back after the test."""
    saved = (minilm.batch_size, minilm.max_batch_tokens, minilm.pass_cost, minilm.pad_multiple)
    yield minilm
    minilm.batch_size, minilm.max_batch_tokens, minilm.pass_cost, minilm.pad_multiple = saved


def test_texts_are_grouped_into_the_cheapest_passes(planner: TransformersEncoder) -> None:
    """Against every way of cutting the length-sorted texts into runs (brute force, up to 9 texts): the
    grouping chosen costs least, takes every text once and keeps to the batch and token bounds."""
    rng = np.random.default_rng(11)
    for _ in range(300):
        n = int(rng.integers(1, 10))
        lengths = [int(x) for x in rng.integers(1, planner.max_length + 1, size=n)]
        planner.batch_size = int(rng.integers(1, 6))
        planner.max_batch_tokens = int(rng.choice([256, 600, 16_384]))
        planner.pass_cost = int(rng.choice([0, 8, 32, 200]))
        planner.pad_multiple = int(rng.choice([1, 16, 100]))
        runs = planner._buckets(lengths)
        assert sorted(i for run in runs for i in run) == list(range(n))
        order = sorted(range(n), key=lengths.__getitem__)
        best = None
        for cuts in itertools.product([False, True], repeat=n - 1):
            candidate: list[list[int]] = [[order[0]]]
            for cut, index in zip(cuts, order[1:], strict=True):
                if cut:
                    candidate.append([index])
                else:
                    candidate[-1].append(index)
            fits = all(_fits(planner, lengths, run) for run in candidate)
            if fits:
                cost = _grouping_cost(planner, lengths, candidate)
                best = cost if best is None else min(best, cost)
        assert all(_fits(planner, lengths, run) for run in runs)
        assert _grouping_cost(planner, lengths, runs) == best, (lengths, runs)


def test_a_long_text_does_not_pad_the_short_ones(planner: TransformersEncoder) -> None:
    # A conversation's turns: many short, one long. One pass would pad twenty 12-token turns to 200 tokens.
    lengths = [12] * 20 + [200]
    runs = planner._buckets(lengths)
    assert [20] in runs
    with pytest.raises(ValueError, match="pass_cost"):
        TransformersEncoder(pass_cost=-1)
    assert _grouping_cost(planner, lengths, runs) < _grouping_cost(planner, lengths, [list(range(21))])


@pytest.mark.parametrize(
    ("fixed_ms", "token_ms", "expected"),
    [(3.5, 0.1, 32), (10.0, 0.1, 128), (0.1, 1.0, 8), (5.0, 0.0, 32)],
)
def test_warm_up_prices_a_pass_from_its_timings(
    planner: TransformersEncoder, monkeypatch: pytest.MonkeyPatch, fixed_ms: float, token_ms: float, expected: int
) -> None:
    """A pass timed at ``fixed + rows x 32 x per token`` is priced at about fixed / per token tokens (a power of
    two, 8-512); with no measurable cost per token the default stays."""
    from memos.embed import transformers_encoder

    clock = [0.0]

    def encode(rows: list[list[int]]) -> Vectors:
        clock[0] += (fixed_ms + token_ms * len(rows) * len(rows[0])) / 1000
        return np.zeros((len(rows), planner.dims), dtype=np.float32)

    monkeypatch.setattr(planner, "_encode", encode)
    monkeypatch.setattr(transformers_encoder.time, "perf_counter", lambda: clock[0])
    planner.pass_cost = transformers_encoder.PASS_COST
    list(planner._measure_pass_cost())
    assert planner.pass_cost == expected


def test_pass_cost_is_timed_on_all_threads_whatever_ran_between_steps(
    planner: TransformersEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    seen: list[int] = []

    def encode(rows: list[list[int]]) -> Vectors:
        seen.append(torch.get_num_threads())
        return np.zeros((len(rows), planner.dims), dtype=np.float32)

    monkeypatch.setattr(planner, "_encode", encode)
    for _ in planner._measure_pass_cost():
        torch.set_num_threads(1)  # a one-thread query served between two steps
    assert seen and set(seen) == {planner.threads}


def test_warm_up_measures_the_pass_cost_unless_told() -> None:
    told = TransformersEncoder(pass_cost=100)
    assert not told.warmed_up
    told.warm_up()
    assert told.pass_cost == 100
    assert told.warmed_up


def test_long_text_is_truncated(minilm: TransformersEncoder) -> None:
    long_text = "word " * 5000
    assert minilm.token_lengths([long_text]) == [256]
    assert minilm.embed([long_text]).shape == (1, 384)


def test_paraphrases_are_closer_than_unrelated_texts(minilm: TransformersEncoder) -> None:
    a, b, c = minilm.embed(
        [
            "A man is eating food.",
            "Someone is having a meal.",
            "The stock market fell sharply on Tuesday.",
        ]
    )
    assert cosine(a, b) > 0.5
    assert cosine(a, b) > cosine(a, c) + 0.3


def test_compatibility_forms_embed_as_their_plain_text(minilm: TransformersEncoder) -> None:
    """Ligatures (as PDF extraction writes them) and full-width letters: the tokenizer made them rare pieces or
    [UNK] (cosine 0.76 for the ligature sentence); they are NFKC-normalized first."""
    wide = full_width("ACME Corp")
    plain, ligature, wide_form, wide_plain = minilm.embed(
        [
            "financial report for the first quarter",
            "\ufb01nancial report for the \ufb01rst quarter",
            f"{wide} signed the lease",
            "ACME Corp signed the lease",
        ]
    )
    assert cosine(plain, ligature) > 0.999
    assert cosine(wide_form, wide_plain) > 0.999
    assert minilm.token_lengths(["\ufb01nance"]) == minilm.token_lengths(["finance"])


# -- the registry ---------------------------------------------------------------------------


def test_registry_refuses_what_is_not_a_local_directory(tmp_path: Path) -> None:
    with pytest.raises(EmbedderLoadError, match="not a local directory"):
        load_embedder("sentence-transformers/all-mpnet-base-v2")
    with pytest.raises(EmbedderLoadError, match=r"no config\.json"):
        load_embedder(str(tmp_path))
    with pytest.raises(EmbedderLoadError, match="not a local directory"):
        load_embedder("hash:64")  # no model-free embedders: memos only serves real models
    with pytest.raises(ValueError, match="dtype"):
        load_embedder(None, dtype="float16")


def test_registry_loads_a_local_encoder_directory(tmp_path: Path) -> None:
    """MEMOS_EMBED_MODEL may name any local HF encoder: here a tiny random BERT built from a config."""
    make_encoder_dir(tmp_path, hidden_size=32)
    texts = ["one", "two words", "three words here"]
    embedder = load_embedder(str(tmp_path), batch_size=2, dtype="float32")
    vectors = embedder.embed(texts)
    assert embedder.name == str(tmp_path)
    assert embedder.dims == 32
    assert vectors.shape == (3, 32)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # bfloat16 weights (what "auto" picks on a CPU with native bf16) give float32 vectors close to these
    half = load_embedder(str(tmp_path), dtype="bfloat16").embed(texts)
    assert half.dtype == np.float32
    assert (half * vectors).sum(axis=1).min() > 0.99


# -- the worker -----------------------------------------------------------------------------


@pytest.mark.parametrize("lanes", [1, 2])
async def test_worker_concurrent_requests_match_direct_calls(minilm: TransformersEncoder, lanes: int) -> None:
    requests = [[f"request {i} about topic {i % 7}", f"second text of {i}"][: 1 + i % 2] for i in range(24)]
    expected = [minilm.embed(texts) for texts in requests]
    async with EmbedWorker.for_embedder(minilm, lanes=lanes) as worker:
        assert worker.ready
        assert worker.dims == 384
        results = await asyncio.gather(*(worker.embed(texts) for texts in requests))
        assert worker.stats.requests == 24
        # Requests that queued up while a batch ran were merged into one embed call.
        assert worker.stats.batches < worker.stats.requests
    for got, want in zip(results, expected, strict=True):
        assert got.shape == want.shape
        assert (got * want).sum(axis=1).min() > SAME_TEXT


async def test_worker_empty_request_skips_the_queue(minilm: TransformersEncoder) -> None:
    async with EmbedWorker.for_embedder(minilm) as worker:
        assert (await worker.embed([])).shape == (0, 384)
        assert worker.stats.requests == 0


async def test_worker_full_queue_raises_busy() -> None:
    gated = GatedEmbedder()
    worker = EmbedWorker.for_embedder(gated, max_queue=2, retry_after=2.5)
    await worker.start()
    running = asyncio.create_task(worker.embed(["first"]))
    await wait_until(gated.entered.is_set)  # the worker holds "first"; the queue is empty again
    queued = [asyncio.create_task(worker.embed([f"queued {i}"])) for i in range(2)]
    await wait_until(lambda: worker.queued_texts == 2)
    with pytest.raises(EmbedderBusy) as busy:
        await worker.embed(["one too many"])
    assert busy.value.retry_after == 2.5
    assert worker.stats.rejected == 1
    gated.gate.set()
    results = await asyncio.gather(running, *queued)
    assert [r.shape for r in results] == [(1, 16)] * 3
    await worker.close()


async def test_worker_bounds_pending_texts() -> None:
    gated = GatedEmbedder()
    worker = EmbedWorker.for_embedder(gated, max_pending_texts=10)
    await worker.start()
    running = asyncio.create_task(worker.embed(["first"]))
    await wait_until(gated.entered.is_set)
    big = asyncio.create_task(worker.embed([str(i) for i in range(25)]))  # alone in the queue: accepted
    await wait_until(lambda: worker.queued_texts == 25)
    with pytest.raises(EmbedderBusy):
        await worker.embed(["more"])
    gated.gate.set()
    assert (await big).shape == (25, 16)
    await running
    await worker.close()


async def test_worker_reports_loading_then_ready() -> None:
    release = threading.Event()

    def slow_factory() -> Embedder:
        assert release.wait(10)
        return HashingEmbedder(8)

    worker = EmbedWorker(slow_factory)
    with pytest.raises(EmbedderLoading):
        await worker.embed(["too early"])  # not even started
    starting = asyncio.create_task(worker.start())
    await wait_until(lambda: worker.state is WorkerState.LOADING)
    assert not worker.ready
    with pytest.raises(EmbedderLoading):
        await worker.embed(["still too early"])
    release.set()
    await starting
    assert worker.ready
    assert worker.name == "hash-8"
    assert (await worker.embed(["now"])).shape == (1, 8)
    await worker.close()
    assert worker.state is WorkerState.CLOSED


async def test_worker_load_failure_is_reported() -> None:
    def broken() -> Embedder:
        raise OSError("weights are missing")

    worker = EmbedWorker(broken)
    with pytest.raises(EmbedderLoadError, match="weights are missing"):
        await worker.start()
    assert worker.state is WorkerState.FAILED
    with pytest.raises(EmbedderLoadError):
        await worker.embed(["x"])
    await worker.close()


async def test_worker_close_fails_waiting_requests() -> None:
    gated = GatedEmbedder()
    worker = EmbedWorker.for_embedder(gated)
    await worker.start()
    running = asyncio.create_task(worker.embed(["running"]))
    await wait_until(gated.entered.is_set)
    waiting = asyncio.create_task(worker.embed(["waiting"]))
    await wait_until(lambda: worker.queued_texts == 1)
    closing = asyncio.create_task(worker.close())
    with pytest.raises(EmbedderClosed):
        await waiting
    gated.gate.set()  # the batch already running still completes
    assert (await running).shape == (1, 16)
    await closing
    with pytest.raises(EmbedderClosed):
        await worker.embed(["after close"])


class SharedThreads(GatedEmbedder):
    """A gated embedder with four CPU threads that records the ``threads`` each pass asked for."""

    threads = 4

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int | None] = []
        self.lanes: list[str] = []
        self.inside = 0
        self.most_inside = 0

    def embed(self, texts: Sequence[str], threads: Threads = None) -> Vectors:
        self.asked.append(threads() if callable(threads) else threads)
        self.lanes.append(threading.current_thread().name)
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            return super().embed(texts)
        finally:
            self.inside -= 1


async def test_worker_lanes_run_passes_side_by_side_on_a_share_of_the_threads() -> None:
    """Two lanes: a pass alone gets every thread on the primary lane, a pass beside it one thread on the spare
    (only one thread ever runs passes on several threads: see memos/embed/worker.py); all lanes stop on close."""
    embedder = SharedThreads()
    worker = EmbedWorker.for_embedder(embedder, lanes=2, thread_name="lanes-test")
    await worker.start()
    first = asyncio.create_task(worker.embed(["first"]))
    await wait_until(lambda: embedder.inside == 1)
    second = asyncio.create_task(worker.embed(["second"]))
    await wait_until(lambda: embedder.inside == 2)  # the second pass did not wait for the first
    embedder.gate.set()
    await asyncio.gather(first, second)
    third = await worker.embed(["third, alone again"])
    assert third.shape == (1, 16)
    assert embedder.asked == [4, 1, 4]
    assert embedder.lanes == ["lanes-test", "lanes-test-1", "lanes-test"]
    assert worker.stats.beside == 1
    lanes = [t for t in threading.enumerate() if t.name.startswith("lanes-test")]
    assert len(lanes) == 2
    await worker.close()
    assert not any(t.is_alive() for t in lanes)


class GatePerText(SharedThreads):
    """``SharedThreads`` whose pass on texts ``[t]`` waits for ``gates[t]`` (when there is one)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate.set()
        self.gates: dict[str, threading.Event] = {}

    def embed(self, texts: Sequence[str], threads: Threads = None) -> Vectors:
        self.asked.append(threads() if callable(threads) else threads)
        self.lanes.append(threading.current_thread().name)
        self.inside += 1
        try:
            gate = self.gates.get(texts[0])
            assert gate is None or gate.wait(10), "test never opened the gate"
            return self.inner.embed(texts)
        finally:
            self.inside -= 1


async def test_only_the_primary_lane_runs_passes_on_several_threads() -> None:
    """A lone request goes to the primary lane, whichever lane is free; a spare runs one thread; the primary
    beside spares gets the threads they leave."""
    embedder = GatePerText()
    async with EmbedWorker.for_embedder(embedder, lanes=3, thread_name="spares-test") as worker:
        for _ in range(3):
            await worker.embed(["alone"])
        tasks = []
        for i, text in enumerate("ABC"):
            embedder.gates[text] = threading.Event()
            tasks.append(asyncio.create_task(worker.embed([text])))
            await wait_until(lambda i=i: embedder.inside == i + 1)
        embedder.gates["A"].set()  # the primary's pass ends; the spares still run B and C
        await tasks[0]
        tasks.append(asyncio.create_task(worker.embed(["D"])))
        await wait_until(lambda: len(embedder.asked) == 7)
        for gate in embedder.gates.values():
            gate.set()
        await asyncio.gather(*tasks)
    assert embedder.asked == [4, 4, 4, 4, 1, 1, 2]
    several = {lane for lane, asked in zip(embedder.lanes, embedder.asked, strict=True) if asked != 1}
    assert several == {"spares-test"}


async def test_the_primary_gives_up_threads_between_its_passes_while_a_spare_runs() -> None:
    """A long call is several forward passes: the primary's limit is asked before each, so a spare that
    starts or ends in the middle changes the threads of the passes that follow."""

    class PassByPass(GatePerText):
        def __init__(self) -> None:
            super().__init__()
            self.limits: list[int] = []
            self.between = [threading.Event(), threading.Event()]

        def embed(self, texts: Sequence[str], threads: Threads = None) -> Vectors:
            if texts[0] != "long":
                return super().embed(texts, threads)
            assert callable(threads)
            self.inside += 1
            try:
                for event in [*self.between, None]:
                    self.limits.append(threads())
                    assert event is None or event.wait(10), "test never opened the gate"
                return self.inner.embed(texts)
            finally:
                self.inside -= 1

    embedder = PassByPass()
    async with EmbedWorker.for_embedder(embedder, lanes=2, thread_name="passes-test") as worker:
        long = asyncio.create_task(worker.embed(["long"]))
        await wait_until(lambda: embedder.limits == [4])
        embedder.gates["short"] = threading.Event()
        short = asyncio.create_task(worker.embed(["short"]))
        await wait_until(lambda: embedder.inside == 2)  # the spare runs beside the long call
        embedder.between[0].set()
        await wait_until(lambda: len(embedder.limits) == 2)
        embedder.gates["short"].set()
        await short
        embedder.between[1].set()
        await long
    assert embedder.limits == [4, 3, 4]
    assert embedder.asked == [1]


async def test_one_lane_runs_one_pass_at_a_time() -> None:
    embedder = SharedThreads()
    async with EmbedWorker.for_embedder(embedder) as worker:
        first = asyncio.create_task(worker.embed(["first"]))
        await wait_until(lambda: embedder.inside == 1)
        second = asyncio.create_task(worker.embed(["second"]))
        await wait_until(lambda: worker.queued_texts == 1)
        embedder.gate.set()
        await asyncio.gather(first, second)
    assert embedder.most_inside == 1
    assert embedder.asked == [4, 4]
    assert worker.stats.beside == 0


async def test_worker_survives_a_cancelled_request() -> None:
    gated = GatedEmbedder()
    worker = EmbedWorker.for_embedder(gated)
    await worker.start()
    running = asyncio.create_task(worker.embed(["running"]))
    await wait_until(gated.entered.is_set)
    abandoned = asyncio.create_task(worker.embed(["abandoned"]))
    await wait_until(lambda: worker.queued_texts == 1)
    abandoned.cancel()
    gated.gate.set()
    await running
    assert (await worker.embed(["later"])).shape == (1, 16)
    assert abandoned.cancelled()
    await worker.close()


async def test_worker_embedding_errors_reach_the_caller() -> None:
    class Failing(HashingEmbedder):
        def embed(self, texts: Sequence[str]) -> Vectors:
            raise RuntimeError("boom")

    async with EmbedWorker.for_embedder(Failing(8)) as worker:
        with pytest.raises(RuntimeError, match="boom"):
            await worker.embed(["x"])
        assert worker.ready  # one failed batch does not stop the worker


async def test_worker_linger_merges_requests_that_arrive_together() -> None:
    async with EmbedWorker.for_embedder(HashingEmbedder(8), linger=0.5) as worker:
        results = await asyncio.gather(*(worker.embed([f"text {i}"]) for i in range(10)))
        assert [r.shape for r in results] == [(1, 8)] * 10
        assert worker.stats.batches == 1


def test_warm_up_traces_the_encoder_and_keeps_every_vector() -> None:
    """After warm-up single texts and padded batches go through the traced encoder (in the weights'
    precision): the same vectors as the eager model's, for query and document lengths, in input order."""
    encoder = TransformersEncoder()
    singles = [[text] for text in SENTENCES]
    before = [encoder.embed(one) for one in singles]
    batch_before = encoder.embed(SENTENCES)
    assert not encoder.traced
    encoder.warm_up()
    encoder.warm_up()  # the second call does nothing
    assert encoder.traced
    for one, was in zip(singles, before, strict=True):
        now = encoder.embed(one)
        assert now.dtype == np.float32 and now.shape == (1, encoder.dims)
        assert abs(float(np.linalg.norm(now[0])) - 1.0) < 1e-5
        assert cosine(now[0], was[0]) >= SAME_TEXT
    batch_now = encoder.embed(SENTENCES)
    assert batch_now.shape == batch_before.shape
    for now_row, was_row in zip(batch_now, batch_before, strict=True):
        assert cosine(now_row, was_row) >= SAME_TEXT
    # One bucket of texts of very different lengths: the padding must not leak into the short ones.
    encoder.batch_size = len(SENTENCES)
    for row, one in zip(encoder.embed(SENTENCES), singles, strict=True):
        assert cosine(row, encoder.embed(one)[0]) >= SAME_TEXT


def test_an_encoder_that_cannot_be_traced_stays_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no tracing here")

    encoder = TransformersEncoder()
    before = encoder.embed(SENTENCES[:1])
    monkeypatch.setattr(torch.jit, "trace", refuse)
    encoder.warm_up()
    assert not encoder.traced
    assert np.allclose(encoder.embed(SENTENCES[:1]), before, atol=1e-6)


def test_a_trace_that_disagrees_with_the_eager_model_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    from memos.embed import transformers_encoder

    encoder = TransformersEncoder(pass_cost=32)  # the same passes before and after warm_up
    before = encoder.embed(SENTENCES)
    monkeypatch.setattr(transformers_encoder, "TRACE_AGREEMENT", 1.01)  # no trace can agree this well
    encoder.warm_up()
    assert not encoder.traced
    assert np.allclose(encoder.embed(SENTENCES), before, atol=1e-6)


async def test_worker_warms_up_while_idle_and_serves_at_once() -> None:
    """Warm-up steps run in the worker thread when no request waits; a request is served between two steps."""
    gate = threading.Event()

    class Warming(HashingEmbedder):
        steps_done = 0
        thread: str | None = None

        def warm_up_steps(self) -> Iterator[None]:
            for _ in range(3):
                assert gate.wait(10)
                self.thread = threading.current_thread().name
                self.steps_done += 1
                yield

    embedder = Warming(8)
    worker = EmbedWorker.for_embedder(embedder, thread_name="warm-test")
    await worker.start()
    assert worker.ready  # ready before any warm-up step has run
    gate.set()
    assert (await worker.embed(["served while warming"])).shape == (1, 8)
    await wait_until(lambda: embedder.steps_done == 3)
    assert embedder.thread == "warm-test"
    await worker.close()


async def test_a_failing_warm_up_does_not_stop_the_worker() -> None:
    class Failing(HashingEmbedder):
        def warm_up_steps(self) -> Iterator[None]:
            raise RuntimeError("no kernels today")
            yield

    worker = EmbedWorker.for_embedder(Failing(8))
    await worker.start()
    assert worker.ready
    assert (await worker.embed(["still works"])).shape == (1, 8)
    await worker.close()


async def test_worker_passes_the_smallest_thread_limit_of_a_coalesced_pass() -> None:
    """A caller's ``threads`` limit reaches an embedder that takes one; merged requests get the smallest."""

    class Limited(HashingEmbedder):
        seen: list[int | None] = []

        def embed(self, texts: Sequence[str], threads: int | None = None) -> Vectors:
            self.seen.append(threads)
            return super().embed(texts)

    embedder = Limited(8)
    async with EmbedWorker.for_embedder(embedder, linger=0.5) as worker:
        await worker.embed(["alone"])
        await worker.embed(["alone, one thread"], threads=1)
        await asyncio.gather(worker.embed(["a"], threads=2), worker.embed(["b"]), worker.embed(["c"], threads=1))
    assert embedder.seen == [None, 1, 1]


async def test_worker_ignores_a_thread_limit_the_embedder_cannot_take() -> None:
    async with EmbedWorker.for_embedder(HashingEmbedder(8)) as worker:
        assert (await worker.embed(["x"], threads=1)).shape == (1, 8)


def test_a_thread_limit_function_is_asked_before_each_pass(planner: TransformersEncoder) -> None:
    texts = ["short"] * 3 + ["a much longer text that goes in a pass of its own " * 8]
    planner.pass_cost = 32  # the short texts share a pass, the long one gets its own
    asked: list[int] = []
    by_pass = planner.embed(texts, threads=lambda: asked.append(len(asked)) or 1 + len(asked) % 2)
    assert len(asked) == len(planner._buckets(planner.token_lengths(texts))) == 2
    for a, b in zip(by_pass, planner.embed(texts, threads=1), strict=True):
        assert cosine(a, b) >= SAME_TEXT


def test_thread_limit_changes_no_vector(minilm: TransformersEncoder) -> None:
    texts = ["What did Caroline research?", "a longer text " * 20]
    # In bfloat16 the split of a matmul across threads changes the rounding: up to 4e-4 apart with 4 or
    # 8 threads (none with 2). float32 agrees to about 1e-7.
    atol = 1e-5 if minilm.dtype == "float32" else 2e-3
    assert np.allclose(minilm.embed(texts, threads=1), minilm.embed(texts), atol=atol)
    assert np.allclose(minilm.embed(texts[:1], threads=1), minilm.embed(texts[:1], threads=8), atol=atol)


async def test_lanes_that_linger_never_take_from_an_empty_queue() -> None:
    """Two lanes lingering for the same request: the one that loses it waits again (it took from an empty
    queue and its thread died, so later requests hung)."""
    embedder = GatePerText()
    async with EmbedWorker.for_embedder(embedder, lanes=2, linger=0.05, thread_name="linger-test") as worker:
        embedder.gates["A"] = threading.Event()
        first = asyncio.create_task(worker.embed(["A"]))
        await wait_until(lambda: embedder.inside == 1)
        second = asyncio.create_task(worker.embed(["B"]))  # the spare starts lingering for it
        embedder.gates["A"].set()  # the primary ends its pass and lingers for it too
        await asyncio.gather(first, second)
        for i in range(3):
            assert (await asyncio.wait_for(worker.embed([f"later {i}"]), 5)).shape == (1, 16)
        assert all(t.is_alive() for t in threading.enumerate() if t.name.startswith("linger-test"))


async def test_the_primary_lets_a_spare_take_what_waits_behind_its_pass() -> None:
    """Requests queued before the primary starts (more than one pass holds) go to a spare beside it."""
    embedder = GatePerText()
    worker = EmbedWorker.for_embedder(embedder, lanes=2, max_coalesce=1, thread_name="behind-test")
    await worker.start()
    embedder.gates["A"] = threading.Event()
    embedder.gates["B"] = threading.Event()
    tasks = [asyncio.create_task(worker.embed([t])) for t in "AB"]
    await wait_until(lambda: embedder.inside == 2)
    for gate in embedder.gates.values():
        gate.set()
    await asyncio.gather(*tasks)
    await worker.close()
