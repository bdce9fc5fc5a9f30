"""numpy's BLAS runs on one thread in the service.

memos' matrix products are small (a batch's new memories against their cube for the kNN links, a graph
search's candidates for diversity): one thread does each in well under a millisecond. OpenBLAS, which
numpy ships, would split them across every core and then keep its helper threads spinning for a while
after each one, on the cores the embedder and Postgres need: with every LoCoMo session batch's kNN
links ranked in numpy, a serial ingest on the 2-core box took 27.8 s of CPU with OpenBLAS's default
threads against 18.9 with the links found in Postgres; on one thread, the same as Postgres.
Concurrency comes from requests, not from inside a product.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def one_blas_thread() -> None:
    """Limit every BLAS library loaded in this process (OpenBLAS, MKL) to one thread, for good."""
    threadpool_limits(limits=1, user_api="blas")
