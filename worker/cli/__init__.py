"""The command line: ``cancel-worker`` (:mod:`worker.cli.main`: run, results, keygen, sim,
demo, dev) and the commands with a module of their own: send, replay, check (``checkup``),
config (``config_report``). The runtime does not import it.
"""
