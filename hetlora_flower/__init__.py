"""hetlora on Flower: the project's rules as a Flower Strategy, the device client as a ClientApp.

Needs the `flower` extra (flwr). The Flower app itself (what `flwr run` reads) is flower_app/;
docs/FLOWER.md explains deployment, simulation and how the concepts map.
"""
