"""Pieces every command group shares: the error console, failing with exit code 2, model loading."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> NoReturn:
    """Print `message` as an error (markup escaped, so paths and prompts print as written) and exit 2."""
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code=2)


def resolve_device(device: str) -> str:
    """'auto' is CUDA when available, else the CPU; anything else is passed through."""
    from diffalign.devices import resolve_device as resolve

    return str(resolve(device))


def load_model_arg(model: str, device: str):
    """Load a `--model` argument ('base', 'base-flow', a model or run folder), failing clearly."""
    from diffalign.models.registry import UnsupportedModelError, load_model

    try:
        return load_model(model, device=resolve_device(device))
    except (FileNotFoundError, UnsupportedModelError) as err:
        fail(str(err))
