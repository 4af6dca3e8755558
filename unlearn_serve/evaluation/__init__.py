"""Evaluation of unlearning through the serving engine: TOFU metrics, reports, plots.

Layering: core <- training, server <- evaluation <- CLI.
"""
