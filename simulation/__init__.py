"""The fleet simulation: real `hetlora serve` / `hetlora client` processes on loopback, a non-IID split of
a dataset over a catalog fleet, one run per method, evaluation and the comparison table (`hetlora demo`).
Not part of what runs on a device (edge_client) or of the server (server_stub); it drives both."""
