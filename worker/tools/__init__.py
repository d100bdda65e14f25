"""Tools around the worker, not the worker: the PAPI simulator (``cancel-worker sim``), the
local dev stack (a Kafka broker fetched and started by the project's own script, the
simulator and worker processes) and the end-to-end demo (``cancel-worker demo``).

Nothing in the runtime (``worker/`` outside this package) imports from here.
"""
