"""numpy's BLAS runs on one thread in the service.

memos' matrix products are small (a big batch's new memories against their cube for the kNN links, a
graph search's candidates for diversity): one thread does most in well under a millisecond and the
largest, a 1000-memory batch into a 2,000-memory cube, in tens. OpenBLAS, which
numpy ships, would split them across every core and then keep its helper threads spinning for a while
after each one, on the cores the embedder and Postgres need: with every LoCoMo session batch's kNN
links ranked in numpy, a serial ingest on the 2-core box took 27.8 s of CPU with OpenBLAS's default
threads against 18.9 with the links found in Postgres (on one thread, 15.0 against 14.2 in a later run).
Concurrency comes from requests, not from inside a product.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def one_blas_thread() -> None:
    """Limit the BLAS libraries loaded in this process so far (numpy's, loaded with it) to one thread, for good.

    torch's own MKL is linked into torch and its OpenMP threads are not BLAS: neither is touched."""
    threadpool_limits(limits=1, user_api="blas")
