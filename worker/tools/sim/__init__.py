"""A PAPI simulator: a real HTTP server with the exchange's signatures, shapes and codes."""
